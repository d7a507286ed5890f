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


def test_the_base_check_applies_to_checkpoints_that_record_a_base():
    from dreamprm.resume import check_base

    fp = {"path": "/models/base", "files": {"model.safetensors": {"bytes": 10, "sha256": "a"}}}
    other = {"path": "/models/base", "files": {"model.safetensors": {"bytes": 10, "sha256": "b"}}}
    check_base(None, fp, "CKPT")  # a checkpoint holding the whole model records none
    check_base(fp, {**fp, "path": "/copy/base"}, "CKPT")  # the same files elsewhere
    with pytest.raises(CheckpointError, match="cannot resume from CKPT: .* /models/base, whose files are not the "
                       "ones the run started from: model.safetensors has the same size but another SHA-256"):
        check_base(fp, other, "CKPT")
