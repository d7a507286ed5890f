"""Real model, real data: does reweighting find the domain with the better step labels? (issue 23)

    python bench/processbench.py --profile gpu          # one H200: ~10 min estimated, not yet measured
    python bench/processbench.py --profile cpu-smoke    # minutes on 2 CPU cores; checks the pipeline only
    python bench/processbench.py --profile cpu-smoke --seed 1 --work_dir /tmp/pb1   # another split

The question. A PRM trains on two domains of real solutions (ProcessBench, QwenLM/ProcessBench at 2f2fd8a
in ../shared/realdata/processbench). Domain `human` (rows of the gsm8k split) keeps ProcessBench's human
first-error labels: steps before the first error 1, that step 0, later steps unlabelled. Domain `outcome`
(rows of the math split) gets outcome-propagated labels, the cheap kind: the solution's final_answer_correct
put on every step. Those are wrong for every correct step of a solution with a wrong answer and for the
erroneous steps of a solution that reaches the right answer anyway (about a fifth of math's erroneous ones).
A good weight module should weigh `human` above `outcome`.

The data, drawn by --seed. Each split's rows are divided into correct (label -1) and erroneous ones, each
half shuffled by the seed, and the parts take from the front: training (--n_human rows of the human split,
--n_outcome of the outcome split), meta (--n_meta of each), test (--n_test of each), each part half correct
and half erroneous, no row in two parts. The meta set (--meta heldout, the default) is the held-out rows'
outcomes only (final_answer_correct; no step label reaches the meta pass): it comes from the same problems,
generators and domains as the test set. --meta gsm8k_candidates takes --n_meta x 2 candidate solutions of
OpenAI's GSM8K model solutions instead (outcomes, another step format, grade-school problems only, and the
same GSM8K test questions as ProcessBench's gsm8k split); it is offered to compare, not the default. The
test set keeps the human labels of both splits, one file per split, so the ProcessBench F1 is the paper's
(per split, then averaged). --shortest N draws every part from each split's N shortest rows (the CPU smoke:
short solutions fit its short max_length). The derived files are dreamprm's JSONL, in --work_dir/data.

The runs, each `python launch/train.py --config GENERATED.yaml` on SmolLM2-135M-Instruct (the folder
`python -m dreamprm.cli smollm2` builds) with LoRA, the same number of updates for all:
  uniform   --baseline: uniform weights on both domains;
  reweight  dreamprm's defaults for the weight module and the meta pass (no meta option is set);
  oracle    --baseline on the human domain alone (more passes over less data).
Each finished run is scored on the test set by `dreamprm evaluate processbench --model RUN` (solutions longer
than max_length are left out and counted), which gives the step AUROC (every labelled step of both splits)
and the ProcessBench F1 at threshold 0.5 (the mean of the two splits' F1). The weight columns are the mean
of RUN/instance_weights.jsonl per domain (tables keep a mean of 1 over the training instances; uniform runs
are 1). wall s: the training run's wall time. Finished runs with the same config and data are reused; results.json in
--work_dir holds every number.

Profiles (flags override their values):
  gpu        bf16, sdpa, packed batches, max_length 2048 (cuts 3 of the 800 training rows at a step boundary;
             longer test rows are left out), batch 8, 300 updates (3 passes over 800 training rows: 200 + 600;
             the oracle 12 over its 200), 40 meta and 140 test rows per split, the 3 runs at once on the one
             GPU. Estimate, unmeasured: 590 tokens a row on average (the trainer's count), 4.7k an update; a
             135M LoRA step of that size is overhead-bound on an H200, ~0.2-0.4 s plain and 2-3x that with the
             default exact meta pass (bench/RESULTS.md: exact k=1 2.67x plain on CPU), so 1-2 min for uniform
             and oracle, 3-6 min for reweight, plus ~1 min of loading and scoring each: under 10 min in all.
  cpu-smoke  fp32, the 16 shortest rows of each split, 3 + 3 training rows, 2 meta and 3 test rows per split,
             max_length 320, batch 1, 5 updates, the 3 runs at once of one thread each. It checks that the
             pipeline runs end to end; its numbers say nothing about reweighting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ../shared from the project root; DREAMPRM_SHARED points elsewhere
SHARED = Path(os.environ.get("DREAMPRM_SHARED", REPO.parent / "shared")) / "realdata"
METHODS = ("uniform", "reweight", "oracle")
DOMAINS = ("human", "outcome")
TAG = "<extra_0>"  # dreamprm's default step tag (added to SmolLM2's vocabulary)

PROFILES = {
    "gpu": {"n_human": 200, "n_outcome": 600, "n_meta": 40, "n_test": 140, "shortest": 0, "max_length": 2048,
            "batch_size": 8, "total_steps": 300, "lr": 2e-4, "warmup_steps": 20, "lr_schedule": "cosine",
            "precision": "bf16", "packing": True, "jobs": 3, "threads": 4},
    "cpu-smoke": {"n_human": 3, "n_outcome": 3, "n_meta": 2, "n_test": 3, "shortest": 16, "max_length": 320,
                  "batch_size": 1, "total_steps": 5, "lr": 2e-4, "warmup_steps": 0, "lr_schedule": "constant",
                  "precision": "fp32", "packing": False, "jobs": 3, "threads": 1},
}


class BenchError(Exception):
    """A problem the user can fix; printed as one message, no traceback."""


# ---------------------------------------------------------------- data


def read_split(data_dir: Path, name: str) -> list:
    """The dreamprm Records of one ProcessBench split (its reader: labels, outcome, meta.first_error)."""
    from dreamprm.data.readers import load_records

    path = data_dir / "processbench" / f"{name}.json"
    if not path.is_file():
        raise BenchError(f"{path}: missing. This bench reads ProcessBench from {data_dir}/processbench (the copy "
                         "in ../shared/realdata); pass --data DIR or set DREAMPRM_SHARED to the folder above "
                         "realdata")
    return load_records(str(path), "processbench", step_tag=TAG)


def divide(records: list, parts: dict, seed: int, shortest: int, flag_of: dict) -> dict:
    """{part: records}: each part half erroneous (first error != -1) and half correct rows of one split, none
    in two parts, drawn by seed (from the `shortest` shortest rows when > 0)."""
    if shortest:
        records = sorted(records, key=lambda r: len(r.question) + sum(map(len, r.steps)))[:shortest]
    rng = random.Random(seed)
    wrong = [r for r in records if r.meta["first_error"] != -1]
    right = [r for r in records if r.meta["first_error"] == -1]
    rng.shuffle(wrong)
    rng.shuffle(right)
    need_w = sum(n // 2 for n in parts.values())
    need_r = sum(n - n // 2 for n in parts.values())
    if need_w > len(wrong) or need_r > len(right):
        split = records[0].domain if records else "?"
        raise BenchError(f"{' + '.join(flag_of[p] for p in parts)} need {need_w} erroneous and {need_r} correct "
                         f"rows of the {split} split; it has {len(wrong)} and {len(right)}"
                         + (f" among its --shortest {shortest}" if shortest else "") + ": lower them")
    out = {}
    for part, n in parts.items():
        out[part] = wrong[:n // 2] + right[:n - n // 2]
        wrong, right = wrong[n // 2:], right[n - n // 2:]
        rng.shuffle(out[part])
    return out


def relabel(r, domain: str, labels: list):
    """A copy of record r in domain `domain` with these step labels (meta keeps its split and first error)."""
    from dataclasses import replace

    return replace(r, id=f"{r.domain}-{r.id}", labels=labels, domain=domain, meta={**r.meta, "split": r.domain})


def build_data(args) -> dict:
    """Write the derived files into --work_dir/data; {name: path} of train, train_human, meta, test_<split>."""
    from dreamprm.data.readers import load_records
    from dreamprm.data.record import write_jsonl

    flags = {"train": "--n_human", "meta": "--n_meta", "test": "--n_test"}
    human = divide(read_split(args.data, args.human_split), {"train": args.n_human, "meta": args.n_meta,
                   "test": args.n_test}, args.seed, args.shortest, flags)
    outcome = divide(read_split(args.data, args.outcome_split), {"train": args.n_outcome, "meta": args.n_meta,
                     "test": args.n_test}, args.seed, args.shortest, {**flags, "train": "--n_outcome"})
    train_h = [relabel(r, "human", r.labels) for r in human["train"]]
    train_o = [relabel(r, "outcome", [r.outcome] * len(r.steps)) for r in outcome["train"]]
    train = train_h + train_o
    random.Random(args.seed).shuffle(train)
    if args.meta == "heldout":
        meta = [relabel(r, None, [None] * len(r.steps)) for r in human["meta"] + outcome["meta"]]
    else:
        path = args.data / "gsm8k_openai_model_solutions" / "example_model_solutions.jsonl"
        if not path.is_file():
            raise BenchError(f"{path}: missing (--meta gsm8k_candidates reads it); pass --data DIR or use "
                             "--meta heldout")
        cands = load_records(str(path), "gsm8k_candidates", step_tag=TAG)
        meta = random.Random(args.seed).sample(cands, 2 * args.n_meta)
    out = args.work_dir / "data"
    (out / "test").mkdir(parents=True, exist_ok=True)
    files = {"train": out / "train.jsonl", "train_human": out / "train_human.jsonl", "meta": out / "meta.jsonl"}
    write_jsonl(train, files["train"])
    write_jsonl(train_h, files["train_human"])
    write_jsonl(meta, files["meta"])
    for split, part in ((args.human_split, human), (args.outcome_split, outcome)):
        files[f"test_{split}"] = out / "test" / f"{split}.jsonl"  # the file stem names the split in the F1
        write_jsonl([relabel(r, split, r.labels) for r in part["test"]], files[f"test_{split}"])
    return files


# ---------------------------------------------------------------- runs


def run_config(args, method: str, files: dict, run_dir: Path) -> dict:
    """The trainer config of one method: the same model, data options and updates for all three."""
    meta = {"baseline": True} if method in ("uniform", "oracle") else {}  # reweight: dreamprm's defaults
    return {
        "data": {"train_file": str(files["train_human" if method == "oracle" else "train"]),
                 "meta_file": "" if meta else str(files["meta"]), "max_length": args.max_length,
                 "packing": args.packing},
        "model": {"name_or_path": str(args.model), "mode": "lora", "attn_implementation": "sdpa"},
        "train": {"total_steps": args.total_steps, "batch_size": args.batch_size, "lr": args.lr,
                  "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps, "precision": args.precision,
                  "seed": args.seed},
        "meta": meta,
        "run": {"output_dir": str(run_dir), "resume_from": "auto", "log_every": max(1, args.total_steps // 30),
                "save_every": args.total_steps, "keep_last": 1, "disable_wandb": True},
    }


def env_for(args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # one process per run
        env.pop(k, None)
    return env


def train_and_score(args, method: str, files: dict) -> dict:
    """One method: train (reused when finished with this same config), score the test set, read the weights."""
    import yaml

    run_dir = args.work_dir / method
    # the data's digest too: another --seed or --n_* rewrites the files under the same names
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files.values())).hexdigest()
    cfg_text = f"# data sha256 {digest}\n" + yaml.safe_dump(run_config(args, method, files, run_dir))
    cfg_path = args.work_dir / f"{method}.yaml"
    status = run_dir / "status.json"
    done = (status.is_file() and json.loads(status.read_text()).get("state") == "finished"
            and cfg_path.is_file() and cfg_path.read_text() == cfg_text and (run_dir / "wall_s.txt").is_file())
    env = env_for(args)
    if not done:
        if run_dir.exists():  # another config, or a run that did not finish: start over
            import shutil
            shutil.rmtree(run_dir)
        cfg_path.write_text(cfg_text)
        print(f"[{time.strftime('%H:%M:%S')}] {method}: training ({args.work_dir / (method + '.log')})", flush=True)
        t0 = time.time()
        with open(args.work_dir / f"{method}.log", "w") as log:
            rc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        if rc != 0:
            raise BenchError(f"{method}: training failed (exit {rc}); see {args.work_dir / (method + '.log')}")
        (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    wall = float((run_dir / "wall_s.txt").read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {method}: trained in {wall:.0f} s, scoring", flush=True)
    report = args.work_dir / f"{method}.eval.json"
    tests = [str(files[k]) for k in files if k.startswith("test_")]
    p = subprocess.run([sys.executable, "-m", "dreamprm.cli", "evaluate", "processbench", "--model", str(run_dir),
                        "--data", *tests, "--from", "dreamprm", "--max-length", str(args.max_length),
                        "--too-long", "skip", "--batch-size", "8", "--out", str(report)],
                       env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError(f"{method}: scoring failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    rep = json.loads(report.read_text())
    weights = {}
    for ln in (run_dir / "instance_weights.jsonl").read_text().splitlines():
        row = json.loads(ln)
        if row["weight"] is not None:
            weights.setdefault(row["domain"], []).append(row["weight"])
    skipped = rep["inputs"].get("too_long", {})
    return {"method": method, "step_auroc": rep["metrics"]["steps"]["auroc"],
            "pb_f1": rep["metrics"]["average_f1"],
            "split_f1": {k: v["f1"] for k, v in rep["metrics"]["splits"].items()},
            "weight": {d: statistics.fmean(weights[d]) if d in weights else None for d in DOMAINS},
            "wall_s": wall, "n_test_scored": sum(rep["inputs"]["records"].values()),
            "too_long": skipped, "run_dir": str(run_dir)}


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--profile", choices=tuple(PROFILES), required=True, help="sizes and precision (see below)")
    g = p.add_argument_group("data (defaults from the profile)")
    g.add_argument("--data", type=Path, default=SHARED, help="the realdata folder (default %(default)s)")
    g.add_argument("--human_split", default="gsm8k", help="ProcessBench split of the human-label domain")
    g.add_argument("--outcome_split", default="math", help="ProcessBench split of the outcome-label domain")
    g.add_argument("--meta", choices=("heldout", "gsm8k_candidates"), default="heldout",
                   help="meta set: held-out ProcessBench rows' outcomes, or GSM8K candidates' outcomes")
    g.add_argument("--seed", type=int, default=0, help="draws the split and seeds every run")
    for k in ("n_human", "n_outcome", "n_meta", "n_test", "shortest"):
        g.add_argument(f"--{k}", type=int, default=None)
    g = p.add_argument_group("training (defaults from the profile; the same for every method)")
    for k, typ in (("max_length", int), ("batch_size", int), ("total_steps", int), ("lr", float),
                   ("warmup_steps", int), ("lr_schedule", str), ("precision", str)):
        g.add_argument(f"--{k}", type=typ, default=None)
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None)
    g = p.add_argument_group("running")
    g.add_argument("--model", type=Path, default=None,
                   help="SmolLM2 folder (default: where `python -m dreamprm.cli smollm2` builds it)")
    g.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    g.add_argument("--work_dir", type=Path, default=None, help="data, runs, logs, results.json "
                   "(default /tmp/dreamprm-processbench/PROFILE-seedN)")
    g.add_argument("--jobs", type=int, default=None, help="runs at once")
    g.add_argument("--threads", type=int, default=None, help="torch threads per run")
    return p


def resolve(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Flags over the profile's values; every problem of the flags in one message."""
    from dreamprm.smollm2 import default_dir, is_built

    args = p.parse_args(argv)
    for k, v in PROFILES[args.profile].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.methods = [m for m in args.methods.split(",") if m]
    problems = [f"--methods: {m!r} is not one of {', '.join(METHODS)}" for m in args.methods if m not in METHODS]
    problems += [f"--{k}: must be >= 1 (got {getattr(args, k)})" for k in
                 ("n_human", "n_outcome", "n_meta", "n_test", "max_length", "batch_size", "total_steps", "jobs",
                  "threads") if getattr(args, k) < 1]
    if args.n_test < 2:
        problems.append(f"--n_test {args.n_test}: needs >= 2 (a correct and an erroneous row per split for the F1)")
    if args.shortest < 0:
        problems.append(f"--shortest: must be >= 0 (got {args.shortest})")
    if args.human_split == args.outcome_split:
        problems.append(f"--human_split and --outcome_split are both {args.human_split!r}: give two splits")
    if args.model is None:
        args.model = default_dir()
        if not is_built(args.model):
            problems.append(f"--model: no SmolLM2 folder at {args.model}; build it with `python -m dreamprm.cli "
                            "smollm2` (or pass --model DIR)")
    elif not (args.model / "config.json").is_file():
        problems.append(f"--model {args.model}: not a model folder (no config.json)")
    if problems:
        p.error("; ".join(problems))
    args.work_dir = (args.work_dir or Path(f"/tmp/dreamprm-processbench/{args.profile}-seed{args.seed}")).resolve()
    args.data = args.data.resolve()
    return args


def fmt(x, nd=3) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def table(rows: list) -> str:
    lines = ["| method | step AUROC | PB F1 | weight human | weight outcome | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['step_auroc'])} | {fmt(r['pb_f1'])} | {fmt(r['weight']['human'], 2)} "
                     f"| {fmt(r['weight']['outcome'], 2)} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = resolve(build_parser(), argv)
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        files = build_data(args)
        n_train = args.n_human + args.n_outcome
        print(f"{args.profile}, seed {args.seed}: train {args.n_human} {args.human_split} (human labels) + "
              f"{args.n_outcome} {args.outcome_split} (outcome labels); meta {args.meta}; test {args.n_test} of "
              f"each split; {args.total_steps} updates of {args.batch_size} "
              f"({args.total_steps * args.batch_size / n_train:.1f} passes; oracle "
              f"{args.total_steps * args.batch_size / args.n_human:.1f}); data in {files['train'].parent}", flush=True)
        t0 = time.time()
        with ThreadPoolExecutor(args.jobs) as ex:
            rows = list(ex.map(lambda m: train_and_score(args, m, files), args.methods))
    except BenchError as e:
        print(f"bench/processbench.py: {e}", file=sys.stderr)
        return 1
    wall = time.time() - t0
    text = table(rows)
    command = "python bench/processbench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.work_dir / "results.json").write_text(json.dumps(
        {"command": command, "profile": args.profile, "seed": args.seed, "wall_s": wall, "rows": rows,
         "files": {k: str(v) for k, v in files.items()}}, indent=1) + "\n")
    skipped = {r["method"]: len(r["too_long"].get("skipped", [])) for r in rows if r["too_long"]}
    print(f"\n{text}\n\nall runs and scoring: {wall:.0f} s; test rows scored: {rows[0]['n_test_scored']}"
          + (f" (longer than max_length, left out: {skipped})" if any(skipped.values()) else "")
          + f"; results: {args.work_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
