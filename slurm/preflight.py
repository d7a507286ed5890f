"""Pre-flight check that slurm/minif2f.sbatch runs on the first node before any rank starts.

    python slurm/preflight.py --nodes 2 --ranks_per_node 8 --config recipes/minif2f.yaml [launch/train.py flags]

`launch/train.py --dry_run` in one process validates the config, data and model, but for a
world of one rank: it cannot see what depends on the job's size. This check runs the trainer's
own checks (dreamprm.preflight, for this world size) and data reading, then adds what a
multi-node job needs:

- every rank gets at least one training example and one meta example (the data is split
  across ranks, BatchStream), so the node count must not exceed what the data can divide;
- the run directory is not locked by a live job (a stale lock of this job, requeued, is fine);
- the checkpoint the job will resume from is complete, its checksums match (a damaged one is
  passed over for the newest intact one, saying so), and it has the same structural settings,
  ZeRO stage and data sizes (another number of ranks is fine: it says that the checkpoint will
  be converted); a requeued job would otherwise fail only after every rank has loaded the model;
- the DeepSpeed JSON's batch fields against this world size;
- that this Python can import dreamprm at all.

It builds no model: no GPU memory, seconds rather than minutes. Every problem is printed,
each saying what to change; exit 2 for a problem dreamprm.preflight finds (the config, the files
and folders it names, the lock; as launch/train.py), 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True, allow_abbrev=False)
    ap.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    ap.add_argument("--ranks_per_node", type=int, required=True, help="training processes per node")
    shape, train_argv = ap.parse_known_args(argv)
    nodes, per_node = shape.nodes, shape.ranks_per_node
    world = nodes * per_node
    job = f"{world} ranks ({nodes} node(s) x {per_node} per node)"

    try:
        from dreamprm import preflight
        from dreamprm.config import ConfigError, parse_config
    except ImportError as e:
        print(f"preflight: error: {sys.executable} cannot import dreamprm ({e}); activate its environment in "
              "the setup block of slurm/minif2f.sbatch, or set PYTHON", file=sys.stderr)
        return 1
    cfg, config_problems, _notes = parse_config(train_argv)
    try:  # a run directory held by a live job makes everything else moot: it is one of these problems
        # the machine check (GPU, bitsandbytes) is left to the ranks: this step may not see the job's GPUs
        for note in preflight.check(cfg, config_problems, world, check_machine=False, check_lock=True):
            print(f"preflight: {note}", flush=True)
    except ConfigError as e:
        print(f"preflight: error: {e}", file=sys.stderr)
        return 2

    from dreamprm import checkpoint
    from dreamprm.config import CHECKPOINTS_DIR
    from dreamprm.data.readers import DataError
    from dreamprm.errors import CheckpointError
    from dreamprm.data.sources import data_paths, run_data
    from dreamprm.model import training_tokenizer
    from dreamprm.resume import check_data, check_resume_config, check_stage, resolve_resume

    problems = []
    bilevel = not cfg.meta.baseline
    data = None  # the data as read (one rank), for the resume check
    try:
        tokenizer = training_tokenizer(cfg.model)
        # first the counts alone (one rank, batches of one), so that a job too wide for its data is told how
        # many nodes fit; then the data as this job's ranks will read it (batch sizes against the examples per rank)
        counting = copy.deepcopy(cfg)
        counting.train.batch_size = counting.meta.meta_batch_size = 1
        data = run_data(counting, tokenizer, rank=0, needs_meta=bilevel)
        train_ex, meta_ex = data.train_ex, data.meta_ex
    except DataError as e:
        problems += e.problems
    except (FileNotFoundError, ValueError, OSError) as e:
        problems.append(str(e))
    else:
        train_path, _, meta_path, _ = data_paths(cfg)
        for what, flag, path, n in (("training", "--train_file", train_path, len(train_ex)),
                                    ("meta", "--meta_file", meta_path, len(meta_ex) if bilevel else world)):
            if n < world:
                fit = n // per_node
                problems.append(
                    f"{flag} {path}: {n} {what} example(s) for {job}; every rank needs at least one. "
                    + (f"Submit with at most --nodes={fit}, " if fit >= 1 else
                       f"Use at most {n} rank(s) (GPUS_PER_NODE={n} on --nodes=1), ")
                    + "fewer GPUS_PER_NODE, or more data.")
        if not problems:
            try:
                run_data(cfg, tokenizer, rank=1, needs_meta=bilevel, world=world)  # rank 1: prints nothing again
            except DataError as e:
                problems += e.problems

    run_dir = Path(cfg.run.output_dir)
    try:  # reads every checksum: a damaged checkpoint is found here, not after the model is built
        ckpt, notes = resolve_resume(cfg, run_dir / CHECKPOINTS_DIR)
        for n in notes:
            print(f"preflight: {n}", flush=True)
        if ckpt is not None:
            man = checkpoint.read_manifest(ckpt)
            check_resume_config(cfg, checkpoint.shared_state(ckpt)["config"])
            check_stage(cfg, ckpt, world)
            if data is not None:
                check_data(data, ckpt)
            if man["world"] != world:
                print(f"preflight: {ckpt} was written by {man['world']} ranks and this job has {job}: "
                      + ("rank 0 converts it to a DeepSpeed universal checkpoint first (minutes for large models); "
                         if man["stage"] > 0 else "")
                      + "the data continues at the same fraction of the epoch", flush=True)
            print(f"preflight: will resume from {ckpt} (update {man['step']})", flush=True)
    except CheckpointError as e:
        problems.append(str(e))

    if problems:
        for p in problems:
            print(f"preflight: error: {p}", file=sys.stderr)
        print(f"preflight: {len(problems)} problem(s); no rank was started", file=sys.stderr)
        return 1
    print(f"preflight: ok for {job}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
