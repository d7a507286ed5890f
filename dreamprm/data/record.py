"""The internal record every reader produces and every consumer reads.

One record is one solution: a question, its reasoning steps, a label per step and an
optional outcome (the meta label). The on-disk form is JSONL with a ``schema`` field so
that a later change of the layout can keep reading old files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from dreamprm.checkpoint import write_atomic
from dreamprm.config import DEFAULT_STEP_TAG
from dreamprm.errors import DataError

SCHEMA_VERSION = 1
# Half of a UTF-16 surrogate pair: JSON's "\ud800" escape decodes to one, but it is no character,
# so UTF-8 encoding (a tokenizer, a file write) fails on it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Record:
    id: str
    question: str
    steps: list[str]
    # One entry per step: a probability in [0, 1] that the step is correct (hard 0/1 or a
    # soft Monte-Carlo estimate), or None where the step carries no label (ProcessBench
    # after the first error, or meta data that only has an outcome).
    labels: list[float | None]
    outcome: float | None = None  # solution-level label in [0, 1] (answer right / proof compiled)
    domain: str | None = None
    meta: dict = field(default_factory=dict)  # free-form provenance kept through conversion

    def to_json(self) -> dict:
        d = {"schema": SCHEMA_VERSION, "id": self.id, "question": self.question,
             "steps": self.steps, "labels": self.labels, "outcome": self.outcome,
             "domain": self.domain}
        if self.meta:
            d["meta"] = self.meta
        return d


def _bad_prob(x) -> bool:
    return (isinstance(x, bool) or not isinstance(x, (int, float))
            or math.isnan(x) or not 0.0 <= x <= 1.0)


def _kind(v) -> str:
    """A value for messages: 'null', "str 'abc'", 'list [1, 2]', 'float 1.0'."""
    if v is None:
        return "null"
    return f"{type(v).__name__} {v[:40]!r}" if isinstance(v, str) else f"{type(v).__name__} {str(v)[:40]}"


def surrogate_problem(text: str) -> str | None:
    """What is wrong with a string holding a lone surrogate, or None."""
    m = _LONE_SURROGATE.search(text)
    if m is None:
        return None
    return (f"lone surrogate \\u{ord(m.group()):04x} at character {m.start() + 1} (half of a UTF-16 pair, not a "
            "character: it cannot be encoded as UTF-8 or tokenized); fix that \\u escape in the file")


def record_problems(rec: Record, step_tag: str = DEFAULT_STEP_TAG) -> list[str]:
    """Everything wrong with one record, as 'field: what' strings (empty when valid)."""
    out = []
    if not isinstance(rec.id, str) or not rec.id:
        out.append("id: must be a non-empty string")
    elif bad := surrogate_problem(rec.id):
        out.append(f"id: {bad}")
    if not isinstance(rec.question, str):
        out.append("question: must be a string")
    elif bad := surrogate_problem(rec.question):
        out.append(f"question: {bad}")
    elif step_tag and step_tag in rec.question:
        out.append(f"question: contains the step tag {step_tag!r} (steps would be misplaced); remove it from the "
                   "text or train with another --step_tag")
    if not isinstance(rec.steps, list) or not rec.steps:
        out.append("steps: must be a non-empty list of strings")
        return out
    if not isinstance(rec.labels, list):
        out.append(f"labels: expected a list (one label per step), got {_kind(rec.labels)}")
    elif len(rec.labels) != len(rec.steps):
        out.append(f"labels: {len(rec.labels)} labels for {len(rec.steps)} steps (need one per step)")
    else:
        for k, y in enumerate(rec.labels):
            if y is not None and _bad_prob(y):
                out.append(f"labels[{k}]: {y!r} is not a number in [0, 1]")
    for k, s in enumerate(rec.steps):
        if not isinstance(s, str):
            out.append(f"steps[{k}]: expected a string, got {_kind(s)}")
        elif not s.strip():
            out.append(f"steps[{k}]: empty step")
        elif bad := surrogate_problem(s):
            out.append(f"steps[{k}]: {bad}")
        elif step_tag and step_tag in s:
            out.append(f"steps[{k}]: contains the step tag {step_tag!r}; remove it from the text")
    if rec.outcome is not None and _bad_prob(rec.outcome):
        out.append(f"outcome: {rec.outcome!r} is not a number in [0, 1]")
    if rec.domain is not None and not isinstance(rec.domain, str):
        out.append("domain: must be a string or null")
    elif rec.domain is not None and (bad := surrogate_problem(rec.domain)):
        out.append(f"domain: {bad}")
    if not isinstance(rec.meta, dict):
        out.append(f"meta: expected an object or null, got {_kind(rec.meta)}")
    return out


def record_from_json(d: dict) -> Record:
    """Build a Record from the internal JSONL form. KeyError names the missing fields; ValueError
    ("field: what; field: what") a schema that is not the integer SCHEMA_VERSION or an id that is
    not a string or an integer (an integer id becomes its string, as it always did)."""
    if not isinstance(d, dict):
        raise ValueError("line is not a JSON object")
    problems = []
    schema = d.get("schema", SCHEMA_VERSION)
    if type(schema) is not int:  # 1.0 and true compare equal to 1: not a schema number all the same
        problems.append(f"schema: expected an integer (this dreamprm reads {SCHEMA_VERSION}), got {_kind(schema)}")
    elif schema != SCHEMA_VERSION:
        problems.append(f"schema: {schema} is not supported (this dreamprm reads {SCHEMA_VERSION})")
    missing = [k for k in ("id", "question", "steps") if k not in d]
    if missing:
        raise KeyError(", ".join(missing))
    rid = d["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        problems.append(f"id: expected a string or an integer, got {_kind(rid)}")
    if problems:
        raise ValueError("; ".join(problems))
    steps = d["steps"]
    labels = d.get("labels", [None] * len(steps) if isinstance(steps, list) else None)
    meta = d.get("meta")
    return Record(id=str(rid), question=d["question"], steps=steps, labels=labels,
                  outcome=d.get("outcome"), domain=d.get("domain"), meta={} if meta is None else meta)


def write_jsonl(records, path) -> None:
    """Write records as the internal JSONL, whole or not at all. Every line is encoded before the
    file is touched, so a record that cannot be (a lone surrogate, say) raises DataError naming it
    and leaves no file; OSError (checkpoint.write_atomic) for the file itself."""
    lines = []
    for k, r in enumerate(records, 1):
        try:
            lines.append((json.dumps(r.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
        except (ValueError, TypeError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
            what = (f"a string holds a lone surrogate ({e.reason}); fix or drop it"
                    if isinstance(e, UnicodeEncodeError) else f"{type(e).__name__}: {e}")
            raise DataError([f"{path}: record {k} (id {r.id!r}) cannot be written as UTF-8 JSON: {what}; "
                             "nothing was written"]) from None
    write_atomic(path, b"".join(lines))
