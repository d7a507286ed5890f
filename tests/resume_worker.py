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
    path = resume.find_resume(cfg, src.parent, rank)
    universal = engine.universal_copy(path, world, rank)
    eng = engine.create_engine(cfg, rank, world, StepLoss(), load_universal=universal is not None)
    shared, per_rank, _ = engine.load_checkpoint(eng, path, universal)
    engine.save_checkpoint(eng, out, shared["step"], {k: shared[k] for k in ("config", "weights", "weights_opt")},
                           {k: per_rank[k] for k in ("train_stream", "meta_stream")}, keep_last=1)


if __name__ == "__main__":
    main()
