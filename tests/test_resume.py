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


def test_transferred_weights_that_changed_since_the_run_started_are_refused(tmp_path):
    import torch

    from dreamprm.resume import check_transferred
    from dreamprm.state import TrainState
    from dreamprm.weights import FixedWeights

    state = TrainState.new(FixedWeights([1.0, 0.5, 2.0]), None, None, None, [0, 0, 0], 1)
    check_transferred(state, {"weights": {"w": torch.tensor([1.0, 0.5, 2.0])}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"--weights_from now gives other weights than the run trained with "
                                              r"\(1 of 3 training examples differ\)"):
        check_transferred(state, {"weights": {"w": torch.tensor([1.0, 0.5, 2.5])}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"\(all of 3"):
        check_transferred(state, {"weights": {"w": torch.ones(4)}}, tmp_path)
    cfg = Config()
    cfg.meta.weights_from = "runs/proxy"
    with pytest.raises(CheckpointError, match="--weights_from: checkpoint has '', this run 'runs/proxy'"):
        check_resume_config(cfg, Config().to_dict())
