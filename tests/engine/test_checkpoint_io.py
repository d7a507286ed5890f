"""Checkpoints through the engine (dreamprm/engine/checkpoint_io.py): a resumed run continues exactly,
also on another number of ranks (DeepSpeed's universal form)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from multirank import TORCHRUN, TRAIN, metrics, run, weights


def fp32_params(ckpt_root: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)


def test_resume_continues_exactly_and_on_another_number_of_ranks(tmp_path):
    # packed batches (--packing): the stream state is the padded one's, so a packed run resumes alike
    z3 = ["--deepspeed", "ds_configs/zero3.json", "--save_every", "3", "--packing"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(TORCHRUN + TRAIN + z3 + ["--total_steps", "6", "--output_dir", str(straight)])
    run(TORCHRUN + TRAIN + z3 + ["--total_steps", "3", "--output_dir", str(split)])
    p = run(TORCHRUN + TRAIN + z3 + ["--total_steps", "6", "--output_dir", str(split)])
    assert "resumed from" in p.stdout
    ma, mb = metrics(straight), metrics(split)
    assert [r["step"] for r in mb] == [r["step"] for r in ma] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ma, mb):
        for key in ("loss", "meta_loss", "w_mean", "w_std", "w_min", "w_max"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key)
    torch.testing.assert_close(weights(split), weights(straight), atol=1e-6, rtol=0)
    pa = fp32_params(straight / "checkpoints", "step_00000006")
    pb = fp32_params(split / "checkpoints", "step_00000006")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-6, rtol=0)
    # a requeued job on another number of ranks: one rank takes over the 2-rank ZeRO-3 checkpoint
    p = run([sys.executable] + TRAIN + z3 + ["--total_steps", "7", "--output_dir", str(split)])
    assert "written by 2 ranks, this run has 1" in p.stdout and "resumed from" in p.stdout
    assert [r["step"] for r in metrics(split)] == [1, 2, 3, 4, 5, 6, 7]
    assert not (split / "checkpoints" / "universal").exists()


def universal_state(ckpt: Path, tmp: Path) -> dict:
    """Every parameter's fp32 weight and Adam moments, and the optimizer's step and hyperparameters,
    read through DeepSpeed's universal format (independent of the number of ranks)."""
    run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
         "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
         "--inject_missing_state"])
    out = {}
    for f in sorted((tmp / "zero").glob("*/*.pt")):  # fp32, exp_avg, exp_avg_sq (frozen weights: fp32 only)
        out[f"{f.parent.name}/{f.stem}"] = torch.load(f, weights_only=False)
    opt = torch.load(tmp / "zero" / "optimizer_state.pt", weights_only=False)
    if "optimizer_state_dict" in opt:  # ZeRO-3 keeps the step here, ZeRO-1/2 in <param>/step.pt
        opt = opt["optimizer_state_dict"]
        out["step"] = opt["state"][0]["step"]
    out["lr"] = torch.tensor(opt["param_groups"][0]["lr"])
    return out


@pytest.mark.parametrize("zero", ["zero3", pytest.param("zero2", marks=pytest.mark.slow)])
def test_checkpoint_resumes_on_another_number_of_ranks(tmp_path, zero):
    """2 -> 1 -> 2 ranks: the loaded parameters, Adam moments, step and weight table equal the saved ones."""
    z3 = ["--deepspeed", f"ds_configs/{zero}.json"]
    run(TORCHRUN + TRAIN + z3 + ["--total_steps", "2", "--output_dir", str(tmp_path / "run")])
    chain = [tmp_path / "run" / "checkpoints" / "step_00000002"]
    for ranks in (1, 2):  # load on that many ranks the way the trainer does, and save again at once
        out = tmp_path / f"on{ranks}"
        launch = TORCHRUN[:-1] + [str(ranks)] if ranks > 1 else [sys.executable]
        run(launch + ["tests/resume_worker.py", str(chain[-1]), str(out)] + TRAIN[1:] + z3)
        chain.append(out / "step_00000002")
        assert json.loads((chain[-1] / "MANIFEST.json").read_text())["world"] == ranks
    saved, *loaded = [universal_state(c, tmp_path / f"universal{i}") for i, c in enumerate(chain)]
    assert len(saved) > 3
    for state in loaded:
        assert state.keys() == saved.keys()
        for k in saved:
            torch.testing.assert_close(state[k], saved[k], atol=0, rtol=0, msg=k)
    tables = [torch.load(c / "dreamprm_state.pt", weights_only=True)["weights"] for c in chain]
    for t in tables[1:]:
        torch.testing.assert_close(t, tables[0], atol=0, rtol=0)
