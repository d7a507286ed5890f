"""Run under torchrun by tests/engine/test_checkpoint_io.py: load a checkpoint the way the trainer does, on
any number of ranks, and write it again at once, so that the test can compare what was loaded.

    torchrun --nproc_per_node N tests/resume_worker.py CHECKPOINT OUT_ROOT [train.py flags...]
"""

import sys
from pathlib import Path

from dreamprm import engine, resume
from dreamprm.config import load_config
from dreamprm.hypergrad import StepLoss


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg, _ = load_config(sys.argv[3:] + ["--resume_from", str(src)])
    rank, world = engine.init_distributed()
    base = resume.base_fingerprint(cfg, rank, world)  # a LoRA run on a named base: checkpoints leave it out
    path = resume.find_resume(cfg, src.parent, rank, base)
    universal = engine.universal_copy(path, world, rank)
    eng = engine.create_engine(cfg, rank, world, StepLoss(), load_universal=universal is not None)
    shared, per_rank, _ = engine.load_checkpoint(eng, path, universal)
    keep = {k: shared[k] for k in ("config", "weights", "weights_opt", "base") if k in shared}
    engine.save_checkpoint(eng, out, shared["step"], keep, {k: per_rank[k] for k in ("train_stream", "meta_stream")},
                           keep_last=1, exclude_frozen=base is not None)


if __name__ == "__main__":
    main()
    engine.close_distributed()
