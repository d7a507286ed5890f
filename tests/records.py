"""A helper for the tests of the input formats: a file's valid records and its problems at once."""

from dreamprm.config import DEFAULT_STEP_TAG
from dreamprm.data.readers import _read


def read_records(path, fmt: str = "auto", step_tag: str = DEFAULT_STEP_TAG):
    """(valid records, every problem as 'FILE:LINE: field: message') from the reader load_records uses,
    which raises on the problems instead; fmt may be "auto"."""
    records, problems, _ = _read(path, fmt, step_tag)
    return records, problems
