"""dreamprm/resume.py: which checkpoint a run resumes from, and what must not change on resume. The
end-to-end resume cases (signals, damage, other rank counts) are in tests/test_train.py, tests/test_faults.py
and tests/test_golden.py."""

import pytest

from dreamprm.config import Config
from dreamprm.errors import CheckpointError
from dreamprm.resume import check_resume_config


def test_checkpoints_from_before_the_mixing_options_resume_and_a_changed_mix_is_refused():
    cfg = Config()
    old = cfg.to_dict()
    for key in ("mix", "curriculum", "profile", "system_prompt", "prompt_template"):
        del old["data"][key]  # a checkpoint written before these options existed
    check_resume_config(cfg, old)
    changed = {**old, "data": {**old["data"], "mix": "temperature"}}
    with pytest.raises(CheckpointError, match="--mix: checkpoint has 'temperature'"):
        check_resume_config(cfg, changed)
