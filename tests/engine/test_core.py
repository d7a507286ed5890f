"""The engine (dreamprm/engine/core.py) under DeepSpeed: every ZeRO stage trains alike, and what only the
built engine can tell is refused."""

import json
import subprocess
import sys

import pytest
import torch
from multirank import ENV, ROOT, TORCHRUN, TRAIN, metrics, run, weights


@pytest.mark.parametrize("accum,stages", [(1, "0123"), (2, "03")])
def test_zero_stages_give_the_same_trajectory(tmp_path, accum, stages):
    zero1 = tmp_path / "zero1.json"
    zero1.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    ds_json = {"0": [], "1": ["--deepspeed", str(zero1)], "2": ["--deepspeed", "ds_configs/zero2.json"],
               "3": ["--deepspeed", "ds_configs/zero3.json"]}
    runs = {}
    for stage in stages:
        d = tmp_path / f"z{stage}"
        run(TORCHRUN + TRAIN + ds_json[stage] + ["--total_steps", "5", "--grad_accum", str(accum),
                                                 "--output_dir", str(d)])
        runs[stage] = (metrics(d), weights(d))
    m0, w0 = runs["0"]
    assert len(m0) == 5
    for stage in stages[1:]:
        m, w = runs[stage]
        assert [r["step"] for r in m] == [r["step"] for r in m0]
        for a, b in zip(m0, m):
            for key in ("loss", "meta_loss", "w_mean", "w_std", "w_min", "w_max"):
                assert abs(a[key] - b[key]) <= 1e-5, (stage, a["step"], key, a[key], b[key])
        torch.testing.assert_close(w, w0, atol=1e-5, rtol=0)
    assert w0.std() > 0  # the weights did move


def test_finite_diff_refused_where_deepspeed_leaves_the_perturbed_parameters_in_bf16(tmp_path):
    """ZeRO 0-2 in bf16 cast LoRA adapters to bf16 too: decided after the engine is built,
    so the config alone (which allows LoRA + finite_diff) cannot catch it."""
    env_rank = {k: v for k, v in ENV.items() if k != "RANK"}
    p = subprocess.run([sys.executable, "launch/train.py", "--mode", "lora", "--precision", "bf16", "--hypergrad",
                        "finite_diff", "--deepspeed", "ds_configs/zero2.json", "--dry_run", "--output_dir",
                        str(tmp_path / "run")], cwd=ROOT, env=env_rank, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "--hypergrad finite_diff" in p.stderr and "bfloat16" in p.stderr and "Traceback" not in p.stderr, \
        p.stderr[-3000:]


def test_the_engine_refuses_a_deepspeed_json_it_cannot_use_before_building_the_model(tmp_path):
    """Pre-flight checks the JSON, but the file may change before the engine reads it again (and bench/ builds
    engines without pre-flight): the same checks, the same one message naming --deepspeed and the file."""
    from dreamprm.config import Config
    from dreamprm.engine import core
    from dreamprm.errors import ConfigError

    cfg, ds = Config(), tmp_path / "ds.json"
    cfg.train.deepspeed = str(ds)
    ds.write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match=f"--deepspeed: {ds}: JSON nested too deeply"):
        core.ds_config(cfg, 1)
    ds.write_text("[1]")
    with pytest.raises(ConfigError, match=f"--deepspeed: {ds}: not a JSON object"):
        core.ds_config(cfg, 1)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}))
    with pytest.raises(ConfigError, match=f"--deepspeed: {ds}: zero_optimization.reduce_bucket_size: .*got \"big\""):
        core.create_engine(cfg, 0, 1, step_loss=None)  # raised before build_prm: no model, no process group
