"""Checkpoints through the engine (dreamprm/engine/checkpoint_io.py): a resumed run continues exactly,
also on another number of ranks (DeepSpeed's universal form); a LoRA run's checkpoints leave its frozen
base out and still resume, score and export exactly."""

import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from multirank import TORCHRUN, TRAIN, metrics, run, weights

from dreamprm import checkpoint as ckpt
from dreamprm import cli
from dreamprm.data.readers import load_records
from dreamprm.engine import consolidated_state_dict
from dreamprm.scoring import ScoringError, load_scorer

DEMO_META = Path(__file__).resolve().parents[2] / "dreamprm" / "demo" / "meta.jsonl"
LOGGED = ("loss", "loss_unweighted", "meta_loss", "w_mean", "w_std", "w_min", "w_max")


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


def named_base(folder: Path) -> Path:
    """A copy of the built-in tiny model as a named base folder: a LoRA run on it leaves the base out of its
    checkpoints, and trains exactly as a run on the built-in model (whose checkpoints hold the whole PRM)."""
    from dreamprm.tiny import default_tiny_dir
    return Path(shutil.copytree(default_tiny_dir(), folder))


@pytest.mark.parametrize("zero,base", [("zero3", "built-in"), ("zero3", "named"),
                                       pytest.param("zero2", "built-in", marks=pytest.mark.slow),
                                       pytest.param("zero2", "named", marks=pytest.mark.slow)])
def test_checkpoint_resumes_on_another_number_of_ranks(tmp_path, zero, base):
    """2 -> 1 -> 2 ranks: the loaded parameters, Adam moments, step and weight table equal the saved ones;
    also for LoRA checkpoints without their base (named: the frozen weights come from the base folder)."""
    z3 = ["--deepspeed", f"ds_configs/{zero}.json"]
    if base == "named":
        z3 += ["--model_name", str(named_base(tmp_path / "base"))]
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
    # a LoRA checkpoint on a named base holds no frozen weight (the universal form has trained ones only)
    module = torch.load(next(chain[0].glob("*model_states.pt")), weights_only=False, map_location="cpu")["module"]
    frozen = [k for k in module if "base_layer" in k or "embed_tokens" in k]
    assert bool(frozen) == (base == "built-in")


# ---------------------------------------------------------------- LoRA checkpoints without the base


_RUNS = {}


def lora_runs_on(ranks: int, tmp: Path) -> SimpleNamespace:
    """Four updates of LoRA on a named base (straight, and interrupted after 2), and the same on the built-in
    model, whose checkpoints hold the whole PRM (the form every checkpoint had before): one set per ranks."""
    if ranks in _RUNS:
        return _RUNS[ranks]
    launch = TORCHRUN if ranks == 2 else [sys.executable]
    zero = ["--deepspeed", "ds_configs/zero3.json"] if ranks == 2 else []
    base = named_base(tmp / "base")
    r = SimpleNamespace(ranks=ranks, base=base, full=tmp / "full", straight=tmp / "straight", split=tmp / "split",
                        launch=launch, on_base=TRAIN + zero + ["--save_every", "2", "--model_name", str(base)])
    run(launch + TRAIN + zero + ["--save_every", "2", "--total_steps", "4", "--output_dir", str(r.full)])
    run(launch + r.on_base + ["--total_steps", "4", "--output_dir", str(r.straight)])
    run(launch + r.on_base + ["--total_steps", "2", "--output_dir", str(r.split)])
    r.resumed = run(launch + r.on_base + ["--total_steps", "4", "--output_dir", str(r.split)]).stdout
    _RUNS[ranks] = r
    return r


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank-zero0", "2rank-zero3"])
def lora_runs(request, tmp_path_factory):
    return lora_runs_on(request.param, tmp_path_factory.mktemp(f"lora{request.param}"))


def logged(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in ("step",) + LOGGED} for r in metrics(run_dir)]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_lora_checkpoint_holds_only_the_trained_weights(lora_runs):
    r = lora_runs
    lora, whole = (d / "checkpoints" / "step_00000004" for d in (r.straight, r.full))
    sd, sd_whole = consolidated_state_dict(lora), consolidated_state_dict(whole)
    trained = {k for k in sd_whole if ".lora_" in k or k.startswith("score.")}
    assert set(sd) == trained and len(sd_whole) > len(trained)
    for k in trained:
        assert torch.equal(sd[k], sd_whole[k]), k
    frozen_bytes = sum(v.numel() * 4 for k, v in sd_whole.items() if k not in trained)  # fp32 in a checkpoint
    assert folder_bytes(whole) - folder_bytes(lora) >= 0.9 * frozen_bytes
    recorded = ckpt.shared_state(lora)["base"]
    assert recorded["path"] == str(r.base.resolve()) and "model.safetensors" in recorded["files"]
    assert "base" not in ckpt.shared_state(whole)


def test_lora_checkpoint_resumes_bit_identically(lora_runs):
    r = lora_runs
    assert "resumed from" in r.resumed
    assert [x["step"] for x in logged(r.split)] == [1, 2, 3, 4]
    assert logged(r.split) == logged(r.straight) == logged(r.full)  # exact: == on the floats
    assert torch.equal(weights(r.split), weights(r.straight)) and torch.equal(weights(r.full), weights(r.straight))


def test_lora_checkpoint_scores_and_exports_as_the_whole_model(lora_runs, tmp_path):
    r = lora_runs
    recs = load_records(DEMO_META, "minif2f")[:6]
    got = load_scorer(r.split, device="cpu").score_records(recs)
    assert got == load_scorer(r.full, device="cpu").score_records(recs)  # exact
    for form in ("merged", "adapter"):
        flag = ["--adapter"] if form == "adapter" else []
        assert cli.main(["export", str(r.split), str(tmp_path / form)] + flag) == 0
        exp = load_scorer(tmp_path / form, device="cpu").score_records(recs)
        assert max(abs(a - b) for k in got for a, b in zip(got[k], exp[k], strict=True)) < 1e-6, form


def test_checkpoint_with_the_whole_model_still_resumes_and_scores(tmp_path_factory):
    """A checkpoint written before LoRA checkpoints left the base out (the whole PRM, no fingerprint): the
    built-in model's, renamed to the named base (same files), resumes exactly; the next one leaves it out."""
    r = lora_runs_on(1, tmp_path_factory.mktemp("lora1"))
    old = tmp_path_factory.mktemp("old") / "run"
    src, dst = r.full / "checkpoints" / "step_00000002", old / "checkpoints" / "step_00000002"
    shutil.copytree(src, dst)
    state = ckpt.shared_state(dst)
    state["config"]["model"]["name_or_path"] = str(r.base)
    torch.save(state, dst / ckpt.SHARED_STATE)
    man = ckpt.read_manifest(src)
    ckpt.write_manifest(dst, 2, man["world"], man["stage"], None, ckpt.describe_files(dst, ckpt.list_files(dst)))
    ckpt.write_latest(dst.parent, dst.name)
    recs = load_records(DEMO_META, "minif2f")[:6]
    assert (load_scorer(old, device="cpu").score_records(recs)
            == load_scorer(r.straight, checkpoint="2", device="cpu").score_records(recs))
    assert "resumed from" in run(r.launch + r.on_base + ["--total_steps", "4", "--output_dir", str(old)]).stdout
    assert logged(old) == logged(r.straight)[2:]
    assert torch.equal(weights(old), weights(r.straight))
    assert "base" in ckpt.shared_state(old / "checkpoints" / "step_00000004")


def test_a_changed_base_folder_is_refused(tmp_path):
    base = named_base(tmp_path / "base")
    out = tmp_path / "run"
    train = [sys.executable] + TRAIN + ["--model_name", str(base), "--output_dir", str(out)]
    run(train + ["--total_steps", "1"])
    weights_file = base / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor: same size, other content
    weights_file.write_bytes(bytes(data))
    why = f"{base.resolve()}, whose files are not the ones the run started from: model.safetensors has the same " \
          "size but another SHA-256 (its content changed)"
    p = run(train + ["--total_steps", "2"], check=False)
    assert p.returncode != 0 and "cannot resume from" in p.stderr and why in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    with pytest.raises(ScoringError, match="cannot load .*" + re.escape(why)):
        load_scorer(out, device="cpu")
    assert cli.main(["export", str(out), str(tmp_path / "export")]) == 1
    (base / "tokenizer.json").unlink()
    with pytest.raises(ScoringError, match="tokenizer.json is missing"):
        load_scorer(out, device="cpu")
    shutil.rmtree(base)
    with pytest.raises(ScoringError, match="does not exist any more"):
        load_scorer(out, device="cpu")
