"""Does reweighting work? A controlled noisy-label experiment on a checkable PRM task (issues 7, 15, 23).

    python bench/reweighting.py                       # random flips: 9 methods x 3 seeds, table + figures
    python bench/reweighting.py --domains a,b,c --kinds none,swap_sub,swap_sub --rates 0,1,1 --epochs 6 \
        --lr 5e-4 --out bench/reweighting/swap_sub --headline   # noise that changes the ranking; main.png
                                                      # beside its results.md
    python bench/reweighting.py --domains a,b,c,d --kinds none,outcome,mc_soft,late --rates 0,1,1,1 \
        --hard_frac 0.3 --out bench/reweighting/labellers      # the labellers of real PRM data
    python bench/reweighting.py --methods baseline,oracle,instance_table --meta_lr 0.3 \
        --out bench/reweighting/meta_lr_0.3           # one point of a meta_lr sweep (all learned methods)
    python bench/reweighting.py --seeds 0 --methods baseline,instance_table --epochs 1   # a quick look
    python bench/reweighting.py --plot_only           # redo table and figures from the finished runs
    python bench/reweighting.py --methods baseline,oracle,instance_domain_table,transfer --proxy_hidden 64 \
        --proxy_layers 1 --hidden 256 --layers 4 --out bench/reweighting/transfer_flip   # learned on a small PRM

The task. A question asks for a chain of additions and subtractions on a number ("Start at 23.
Apply +7, -4, +9."); every step states one computation ("23 + 7 = 30"). A wrong solution makes
one slip (a result off by 1 to 3) and carries on correctly from the wrong value. Step labels follow
the PRM convention: 1 before the first wrong step, 0 from it on. Step correctness is checkable
from the text, so the truth is known for every label. With one slip a right final answer means
every step is right; --hard_frac makes that fraction of the wrong solutions (training, meta and
test) slip twice, the second slip cancelling the first (+2 then -2 against the true chain), so the
final answer is right although two steps are wrong.

The data. Training records come from several domains (--domains); each domain's step labels are
corrupted at its own rate and kind (--kinds, --rates); rate is the probability that a solution is
relabelled by the kind (flip: per step):
  none        labels as computed;
  flip        every step label flipped independently with probability rate;
  optimistic  with probability rate, a wrong solution gets every step marked correct
              (a labeller that only checks the format);
  shift       with probability rate, a wrong solution's first error is moved one step earlier or
              later (kept inside the solution);
  blind_sub   a labeller that does not check subtractions: with probability rate, a wrong solution
              whose slip is in a subtraction step gets every step marked correct (noise that
              depends on the text, unlike the others);
  swap_sub    a labeller that has subtraction the wrong way round: with probability rate per
              solution it judges every subtraction step inverted (a correct one wrong, a slip
              right) and labels 1 before the first step it judges wrong, 0 from it on. It marks
              correct steps wrong and wrong steps right depending on the text, so where such
              labels are the majority the label ranking itself changes (steps after a correct
              subtraction look worse than some wrong steps), not only its noise level;
  outcome     outcome propagation: every step gets the solution's final-answer label (a wrong
              solution all 0, its correct steps before the slip included; a right one all 1).
              With one slip a right answer has no wrong step, so only wrong solutions change;
              with --hard_frac the compensated ones are right answers whose wrong steps get 1;
  late        the first wrong step is judged right, the error starts one step later
              ([1,1,0,0] -> [1,1,1,0]; a slip in the last step: all 1);
  mc_soft     Monte-Carlo rollout labels from a weak completer: the label of step k is the
              fraction of --mc_rollouts completions from the prefix up to step k that reach the
              right final answer; the completer gets each remaining step right with probability
              --mc_skill, and a prefix whose value is off the true chain never reaches it. So
              correct early steps of long solutions get labels well below 1 (mean
              mc_skill ** steps left): biased toward the completer's ability. The labels are
              soft floats in [0, 1]; dreamprm reads them as they are (float32) and its default
              step loss is the soft-label cross-entropy. Use rate 1 for outcome and mc_soft
              (a whole labelled set from one labeller).
A training instance is "corrupted" when at least one of its labels differs from the truth (for
mc_soft nearly every relabelled solution). The meta set (clean, outcome labels only), the test set
(clean step labels) and the best-of-N groups (--bon_n candidates per question) come from the same
generator, uncorrupted. With --bon_hard (on by default; --no-bon_hard for the single-slip groups)
half of the wrong best-of-N candidates are compensated: right final answer, wrong steps. A pick
counts as correct only when every step of the picked candidate is correct, so picking by the
final answer does not saturate the metric; the table shows the random pick's expected accuracy.

The runs. Every method trains the same PRM (a random Qwen2 of --hidden / --layers built by
dreamprm.tiny, full fine-tune, fp32, one process) for the same number of PRM updates
(--epochs over the training set), through `python launch/train.py` with a generated config.
Baselines, no meta pass: baseline (--baseline: uniform weights); uniform_meta (uniform weights on
the training set plus the meta set's data where it can be used: each meta record with a right
final answer becomes a training example with every step labelled correct, in its own domain
"meta"; a wrong-answer meta record does not say which step is wrong, so it carries no step label
and is left out); loss_select (no meta set: a uniform warm-up run of --select_warmup updates,
default a third of the run's, scores every training record by the mean over its steps of the BCE
of its label against the predicted probability; the --select_drop fraction with the highest loss
gets weight 0, the rest 1, written as an instance_weights.jsonl; then the PRM trains from scratch
for the full updates with --weights_from; its wall time is both runs'). Learned: instance_table,
instance_net, domain_table, instance_domain_table (an instance row times its domain's factor).
Their meta pass runs with dreamprm's own defaults (dreamprm.config.MetaConfig): the config passes
no meta-pass setting unless its flag is given (--meta_lr, for every learned method at once,
--hypergrad, --aggregation, --fd_radius, --table_optimizer, --meta_warmup, --meta_batch_size,
--meta_interval); results.md states the settings used. The ceiling of any reweighting, oracle:
uniform weights on the uncorrupted domains alone (the same number of updates, so more passes over
less data), and transfer: --transfer_method learns the weights on a smaller proxy PRM
(--proxy_hidden / --proxy_layers, same data, same updates), then the PRM of --hidden / --layers
trains with them fixed (--weights_from: no meta pass); its cost is the wall time of both runs,
next to each method's own (the "wall s" column). Before training the command prints how many
training runs it launches (finished ones are reused). Each run evaluates on the test set every
--eval_every updates (eval_step_auroc in metrics.jsonl); the domain-table runs checkpoint every
--ckpt_every updates so the domain weights can be followed over time. After training, the final
model scores the test set and the best-of-N groups (dreamprm.scoring.load_scorer), and
instance_weights.jsonl gives the weights the run trained with.

Reported per method, mean and spread (min..max) over --seeds (each seed draws its own data and
initialisation): clean-test step AUROC, ProcessBench-style F1 (first predicted error vs the true
first error, threshold 0.5), best-of-N accuracy (--bon_aggregation), the AUROC of the weights at
telling clean from corrupted instances (clean = positive, so 1.0 means every corrupted instance
weighs less than every clean one; 0.5 for uniform weights), pooled over all instances and within
each corrupted domain (then the mean over those domains: a domain-level weight scores 0.5 there),
the mean weight per domain, and per seed the share of the gap to oracle recovered, against uniform
((method - baseline) / (oracle - baseline)) and against the best baseline ((method - best) /
(oracle - best), best the max per metric over baseline, uniform_meta, loss_select). The weights
are those the runs used: dreamprm's tables normalise to mean 1 over the training instances;
loss_select's are its 0/1 selection. Output: --out/results.md (committed), and
--artifacts/results.json with the PNG figures (an ignored folder: bench/out/<the --out path under
bench/> by default, regenerated by the same command with --plot_only); --headline also puts
main.png beside results.md. Runs go to --work_dir.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dreamprm.checkpoint import SHARED_STATE, write_atomic
from dreamprm.config import AGGREGATIONS, CHECKPOINTS_DIR, TABLE_OPTIMIZERS
from dreamprm.config import METHODS as HYPERGRADS

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
METHODS = ("baseline", "uniform_meta", "loss_select", "instance_table", "instance_net", "domain_table",
           "instance_domain_table", "oracle", "transfer")
BASELINES = ("baseline", "uniform_meta", "loss_select")  # no meta pass: what a reweighting must beat
LEARNED = ("instance_table", "instance_net", "domain_table", "instance_domain_table")
KINDS = ("none", "flip", "optimistic", "shift", "blind_sub", "swap_sub", "outcome", "late", "mc_soft")


# ---------------------------------------------------------------- the task


def solve(rng: random.Random, n_steps: int, max_value: int, wrong: bool, slips: str = "odd",
          err_at: int | None = None, slip_rng: random.Random | None = None, comp_at: int | None = None) -> dict:
    """One question and one solution. A wrong solution slips once and goes on correctly from the
    wrong value; labels are 1 before the slip and 0 from it on.

    slips="odd": the chain starts even and adds or subtracts even numbers, and a slip is off by 1
    or 3, so a wrong result is odd: a parity cue a small model learns in a few hundred updates.
    slips="xor": any start and operand, a slip is off by 1 or 3: a wrong result has the wrong parity,
    which the model finds from the parities of the two operands (an XOR).
    slips="any": any start and operand, a slip is off by 1 to 3: the model has to learn addition.
    err_at / slip_rng: place the slip and draw its size elsewhere (best-of-N candidates).
    comp_at (> err_at): a second, compensating slip there: that step states the true chain's value
    instead of its own sum, so the final answer is right although two steps are wrong (the outcome
    says 1, the step labels say 0 from err_at on). on_track[k]: whether the value after step k is
    the true chain's (what a completer continuing from that prefix needs to reach the right answer)."""
    even = slips == "odd"
    x0 = rng.randrange(0, max_value + 1, 2 if even else 1)
    ops, x, chain = [], x0, []
    for _ in range(n_steps):  # the true chain stays inside [0, max_value]
        d = rng.choice((2, 4, 6, 8)) if even else rng.randint(1, 9)
        sign = rng.choice("+-")
        if sign == "+" and x + d > max_value:
            sign = "-"
        if sign == "-" and x - d < 0:
            sign = "+"
        ops.append((sign, d))
        x = x + d if sign == "+" else x - d
        chain.append(x)
    truth = x
    if err_at is None:
        err_at = rng.randrange(n_steps) if wrong else n_steps
    if comp_at is not None and not err_at < comp_at < n_steps:
        raise ValueError(f"comp_at {comp_at} must lie after err_at {err_at} and inside {n_steps} steps")
    steps, labels, on_track, x = [], [], [], x0
    for k, (sign, d) in enumerate(ops):
        y = x + d if sign == "+" else x - d
        if k == err_at:
            r = slip_rng or rng
            off = r.randint(1, 3) if slips == "any" else r.choice((1, 3))
            # a compensated slip keeps every wrong value up to comp_at >= 0
            low = min(chain[err_at:comp_at]) if comp_at is not None else y
            y = y + off if low - off < 0 or r.random() < 0.5 else y - off
        elif k == comp_at:
            y = chain[k]
        steps.append(f"{x} {sign} {d} = {y}")
        labels.append(1.0 if k < err_at else 0.0)
        on_track.append(y == chain[k])
        x = y
    question = f"Start at {x0}. Apply " + ", ".join(f"{s}{d}" for s, d in ops) + "."
    return {"question": question, "steps": steps, "labels": labels, "outcome": float(x == truth),
            "first_error": -1 if err_at == n_steps else err_at, "on_track": on_track}


def corrupt(labels: list[float], kind: str, rate: float, rng: random.Random, steps: list[str] = (),
            outcome: float | None = None, on_track: list[bool] | None = None, mc_rollouts: int = 8,
            mc_skill: float = 0.8) -> list[float]:
    """The labels a noisy labeller of this kind writes (see the module docstring).

    outcome: the solution's final-answer label (default: 1 when every label is 1, as with one slip);
    on_track: whether the value after each step is the true chain's (default: the label is 1), which
    decides whether a Monte-Carlo completion from that prefix can reach the right answer."""
    y = list(labels)
    if kind == "none" or rate <= 0:
        return y
    wrong = min(y) < 0.5
    if kind == "flip":
        return [1.0 - v if rng.random() < rate else v for v in y]
    if kind == "optimistic":
        return [1.0] * len(y) if wrong and rng.random() < rate else y
    if kind == "shift":
        if not wrong or rng.random() >= rate:
            return y
        k = y.index(0.0)
        moves = [m for m in (k - 1, k + 1) if 0 <= m < len(y)]
        k = rng.choice(moves)
        return [1.0 if i < k else 0.0 for i in range(len(y))]
    if kind == "blind_sub":
        return [1.0] * len(y) if wrong and steps[y.index(0.0)].split()[1] == "-" and rng.random() < rate else y
    if kind == "swap_sub":
        if rng.random() >= rate:
            return y
        judged_ok = [check_step(s) != (s.split()[1] == "-") for s in steps]
        k = judged_ok.index(False) if False in judged_ok else len(y)
        return [1.0 if i < k else 0.0 for i in range(len(y))]
    if kind == "outcome":
        if rng.random() >= rate:
            return y
        z = (0.0 if wrong else 1.0) if outcome is None else float(outcome)
        return [z] * len(y)
    if kind == "late":
        if not wrong or rng.random() >= rate:
            return y
        k = y.index(0.0) + 1  # the first wrong step is judged right; the error starts one step later
        return [1.0 if i < k else 0.0 for i in range(len(y))]
    if kind == "mc_soft":
        if rng.random() >= rate:
            return y
        track = [v >= 0.5 for v in y] if on_track is None else on_track
        out = []
        for k, ok in enumerate(track):
            left = len(y) - 1 - k  # steps the completer still has to get right
            hits = sum(all(rng.random() < mc_skill for _ in range(left)) for _ in range(mc_rollouts)) if ok else 0
            out.append(hits / mc_rollouts)
        return out
    raise ValueError(f"unknown corruption kind {kind!r} (choose from {', '.join(KINDS)})")


def compensated_slip(rng: random.Random, n_steps: int) -> tuple[int, int]:
    """(err_at, comp_at) of a solution with two compensating slips: the first anywhere but the last step,
    the second after it."""
    err_at = rng.randrange(n_steps - 1)
    return err_at, rng.randrange(err_at + 1, n_steps)


def make_record(rng, rid, args, domain=None, kind="none", rate=0.0, wrong=None) -> dict:
    """One solution, labelled by a labeller of this kind; meta keeps the true labels. With --hard_frac a wrong
    solution is, at that rate, one with two compensating slips (right final answer, wrong steps)."""
    if wrong is None:
        wrong = rng.random() < args.wrong_frac
    n_steps = rng.randint(args.min_steps, args.max_steps)
    if wrong and args.hard_frac > 0 and n_steps >= 2 and rng.random() < args.hard_frac:
        err_at, comp_at = compensated_slip(rng, n_steps)
        s = solve(rng, n_steps, args.max_value, True, args.slips, err_at=err_at, comp_at=comp_at)
    else:
        s = solve(rng, n_steps, args.max_value, wrong, args.slips)
    noisy = corrupt(s["labels"], kind, rate, rng, s["steps"], outcome=s["outcome"], on_track=s["on_track"],
                    mc_rollouts=args.mc_rollouts, mc_skill=args.mc_skill)
    return {"schema": 1, "id": rid, "question": s["question"], "steps": s["steps"], "labels": noisy,
            "outcome": s["outcome"], "domain": domain,
            "meta": {"true_labels": s["labels"], "first_error": s["first_error"], "kind": kind,
                     "corrupted": noisy != s["labels"]}}


def meta_as_training(meta: list[dict]) -> list[dict]:
    """uniform_meta's extra training records: each meta record with a right final answer, every step
    labelled correct, in its own domain "meta". A wrong-answer record says only that some step is wrong,
    not which, so it gives no step label and is left out. With --hard_frac a right answer can hide two
    wrong steps: such a record's labels are wrong, and meta.corrupted says so."""
    out = []
    for r in meta:
        if r["outcome"] == 1.0:
            labels = [1.0] * len(r["steps"])
            out.append({**r, "labels": labels, "domain": "meta",
                        "meta": {**r["meta"], "kind": "none", "corrupted": labels != r["meta"]["true_labels"]}})
    return out


def generate(args, seed: int, out: Path) -> dict:
    """train / meta / test / bon JSONL files for one seed (internal dreamprm format), and the training
    sets of oracle (train_clean) and uniform_meta (train_meta)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    train = []
    for dom, kind, rate in zip(args.domains, args.kinds, args.rates):
        train += [make_record(rng, f"{dom}-{i:05d}", args, dom, kind, rate) for i in range(args.n_train)]
    rng.shuffle(train)
    meta = []
    for i in range(args.n_meta):  # outcome only: the meta pass never sees a step label
        r = make_record(rng, f"meta-{i:05d}", args)
        r.update(labels=[None] * len(r["steps"]), domain=None)
        meta.append(r)
    test = [make_record(rng, f"test-{i:05d}", args) for i in range(args.n_test)]
    bon = []
    for g in range(args.n_bon_groups):  # candidates to one question: the same start and operations
        n_steps = rng.randint(args.min_steps, args.max_steps)
        q_seed = rng.random()
        for c in range(args.bon_n):
            wrong = rng.random() < args.wrong_frac
            err_at, comp_at = (rng.randrange(n_steps) if wrong else n_steps), None
            if wrong and args.bon_hard and n_steps >= 2 and rng.random() < 0.5:
                err_at, comp_at = compensated_slip(rng, n_steps)
            s = solve(random.Random(q_seed), n_steps, args.max_value, False, args.slips,
                      err_at=err_at, slip_rng=rng, comp_at=comp_at)
            bon.append({"schema": 1, "id": f"bon-{g:04d}-{c}", "question": s["question"], "steps": s["steps"],
                        "labels": s["labels"], "outcome": s["outcome"], "domain": None,
                        "meta": {"group": g, "first_error": s["first_error"], "hard": comp_at is not None}})
    train_clean = [r for r in train if r["meta"]["kind"] == "none"]
    files = {}
    for name, rows in (("train", train), ("train_clean", train_clean), ("train_meta", train + meta_as_training(meta)),
                       ("meta", meta), ("test", test), ("bon", bon)):
        files[name] = out / f"{name}.jsonl"
        # whole: a run of another invocation may be reading it
        write_atomic(files[name], "".join(json.dumps(r) + "\n" for r in rows))
    return files


def check_step(text: str) -> bool:
    """Whether a step's stated computation is right ("23 + 7 = 30")."""
    a, sign, d, _, y = text.split()
    return (int(a) + int(d) if sign == "+" else int(a) - int(d)) == int(y)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


# ---------------------------------------------------------------- training runs


# The meta-pass settings a learned method's config passes only when their flag is given; otherwise
# dreamprm's own defaults (dreamprm.config.MetaConfig) apply, the ones a user of dreamprm gets.
META_PASS = ("hypergrad", "meta_lr", "aggregation", "fd_radius", "table_optimizer", "meta_warmup",
             "meta_batch_size", "meta_interval")


def meta_overrides(args) -> dict:
    """The meta-pass settings given on the command line (the rest stay dreamprm's defaults)."""
    return {k: getattr(args, k) for k in META_PASS if getattr(args, k) is not None}


def meta_settings(args) -> dict:
    """The meta-pass settings the learned methods run with: dreamprm's defaults, then the overrides."""
    from dreamprm.config import MetaConfig

    d = MetaConfig()
    return {**{k: getattr(d, k) for k in META_PASS}, **meta_overrides(args)}


def total_updates(args) -> int:
    """PRM updates of every method's run: --epochs over the training set (all domains)."""
    return max(1, round(args.epochs * args.n_train * len(args.domains) / args.batch_size))


def warmup_updates(args) -> int:
    """loss_select's uniform warm-up run: --select_warmup, default a third of the run's updates."""
    return args.select_warmup if args.select_warmup is not None else max(1, round(total_updates(args) / 3))


TRAIN_FILE = {"oracle": "train_clean", "uniform_meta": "train_meta"}  # the others train on "train"
UNIFORM = ("baseline", "oracle", "uniform_meta", "loss_select-warmup")  # --baseline runs


def run_config(args, method: str, seed: int, files: dict, model_dir: Path, run_dir: Path,
               weights_from: Path | None = None, steps: int | None = None) -> dict:
    """The trainer config of one run; weights_from: fixed weights (transfer: the proxy run's; loss_select: its
    0/1 selection), no meta pass; steps: the updates when not the full run's (loss_select's warm-up)."""
    steps = steps or total_updates(args)
    uniform = method in UNIFORM
    cfg = {
        "data": {"train_file": str(files[TRAIN_FILE.get(method, "train")]),
                 "meta_file": str(files["meta"]), "eval_file": str(files["test"]), "max_length": 256},
        "model": {"name_or_path": str(model_dir), "mode": "full", "chat_template": False},
        "train": {"total_steps": steps, "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": "constant",
                  "warmup_steps": 0, "grad_clip": 1.0, "precision": "fp32", "seed": seed},
        "meta": {"baseline": uniform, "weights": "instance_table" if uniform else method,
                 **({} if uniform else meta_overrides(args))},
        "run": {"output_dir": str(run_dir), "resume_from": "auto", "log_every": args.log_every,
                "eval_every": args.eval_every,
                "save_every": args.ckpt_every if method == "domain_table" else steps,
                "keep_last": 10**6 if method == "domain_table" else 1, "disable_wandb": True},
    }
    if weights_from is not None:  # no meta pass: no meta file, no meta-pass options
        del cfg["data"]["meta_file"]
        cfg["meta"] = {"weights_from": str(weights_from)}
    return cfg


def train_one(args, method: str, seed: int, files: dict, model_dir: Path, name: str | None = None,
              weights_from: Path | None = None, steps: int | None = None) -> Path:
    """One finished run (reused when it is there); its wall time goes to RUN/wall_s.txt."""
    import yaml

    name = name or method
    run_dir = args.work_dir / f"seed{seed}" / name
    if finished(run_dir):
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(args, method, seed, files, model_dir, run_dir, weights_from,
                                                  steps)))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env.pop("RANK", None)
    t0 = time.time()
    with open(run_dir.parent / f"{name}.log", "w") as log:
        rc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {rc}); see {run_dir.parent / (name + '.log')}")
    (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    print(f"  trained {name:15s} seed {seed} in {time.time() - t0:.0f} s", flush=True)
    return run_dir


def finished(run_dir: Path) -> bool:
    st = run_dir / "status.json"
    return st.is_file() and json.loads(st.read_text()).get("state") == "finished"


def proxy_name(args) -> str:
    return f"proxy-{args.transfer_method}"


def runs_of(args, method: str) -> list[str]:
    """The run directories (names under seedN/) a method trains, in order; its wall time is theirs summed."""
    if method == "transfer":
        return [proxy_name(args), "transfer"]
    if method == "loss_select":
        return ["loss_select-warmup", "loss_select"]
    return [method]


def loss_select_weights(args, warm_dir: Path, train: list[dict], out: Path) -> Path:
    """Score every training record with the warm model, weight the --select_drop fraction with the highest loss
    0 and the rest 1, and write them as an instance_weights.jsonl (the rows --weights_from reads: id, index,
    domain, weight). Loss of a record: the mean over its steps of the BCE of its label (soft labels as they are)
    against the predicted probability, clamped away from 0 and 1 so one confident step cannot dominate."""
    scores = score(warm_dir, train)
    eps = 1e-6
    losses = []
    for r in train:
        ps = [min(max(p, eps), 1 - eps) for p in scores[r["id"]]]
        losses.append(statistics.fmean(-(y * math.log(p) + (1 - y) * math.log(1 - p))
                                       for y, p in zip(r["labels"], ps)))
    n_drop = round(args.select_drop * len(train))
    dropped = set(sorted(range(len(train)), key=lambda i: -losses[i])[:n_drop])
    rows = [{"id": r["id"], "index": i, "domain": r["domain"], "weight": 0.0 if i in dropped else 1.0,
             "loss": losses[i]} for i, r in enumerate(train)]
    out.mkdir(parents=True, exist_ok=True)  # its own folder: no config.yaml beside it, so rows match by id
    path = out / "instance_weights.jsonl"
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_method(args, method: str, seed: int, files: dict, model_dir: Path, proxy_dir: Path | None) -> Path:
    """A method's run; transfer: the proxy PRM learns --transfer_method's weights, the target trains with them;
    loss_select: a uniform warm-up run scores the training set, the PRM trains from scratch with the selection."""
    if method == "transfer":
        proxy = train_one(args, args.transfer_method, seed, files, proxy_dir, name=proxy_name(args))
        return train_one(args, "transfer", seed, files, model_dir, weights_from=proxy)
    if method == "loss_select":
        warm = train_one(args, "loss_select-warmup", seed, files, model_dir, steps=warmup_updates(args))
        run_dir = args.work_dir / f"seed{seed}" / "loss_select"
        if finished(run_dir):
            return run_dir
        w = loss_select_weights(args, warm, read_jsonl(files["train"]), run_dir.parent / "loss_select-weights")
        return train_one(args, "loss_select", seed, files, model_dir, weights_from=w)
    return train_one(args, method, seed, files, model_dir)


def wall_s(args, method: str, run_dir: Path) -> float:
    """Wall seconds of a method: every run it trains (transfer: the proxy's too; loss_select: the warm-up's)."""
    def read(d):
        f = d / "wall_s.txt"
        return float(f.read_text()) if f.is_file() else math.nan
    return sum(read(run_dir.parent / name) for name in runs_of(args, method))


# ---------------------------------------------------------------- evaluation


def score(run_dir: Path, records: list[dict]) -> dict:
    from dreamprm.data.record import record_from_json
    from dreamprm.scoring import load_scorer

    scorer = load_scorer(run_dir, device="cpu")
    return scorer.score_records([record_from_json(r) for r in records], batch_size=64)


def weight_aurocs(args, w: list[float], recs: list[dict]) -> tuple[float, float]:
    """(pooled, within-domain) AUROC of the weights at telling clean (positive) from corrupted records.
    Pooled: over every weighted record, so a method that only weighs whole domains can score high. Within:
    per corrupted domain (a --kinds entry other than none with a rate above 0), its clean against its
    corrupted records, then the mean over the domains that have both (nan when none has)."""
    from dreamprm import metrics as M

    clean = [0.0 if r["meta"]["corrupted"] else 1.0 for r in recs]
    pooled = M.auroc(w, clean)  # nan without both classes; uniform weights tie: 0.5
    within = []
    for d, k, rate in zip(args.domains, args.kinds, args.rates):
        idx = [i for i, r in enumerate(recs) if r["domain"] == d]
        ys = [clean[i] for i in idx]
        if k != "none" and rate > 0 and 0 < sum(ys) < len(ys):
            within.append(M.auroc([w[i] for i in idx], ys))
    return pooled, (statistics.fmean(within) if within else math.nan)


def evaluate_run(args, run_dir: Path, files: dict) -> dict:
    """The metrics of one finished run (see the module docstring). A best-of-N pick counts as correct only when
    every step of the picked candidate is correct (the final answer alone can be right by compensating slips)."""
    from dreamprm import metrics as M

    test, bon, train = read_jsonl(files["test"]), read_jsonl(files["bon"]), read_jsonl(files["train"])
    s_test = score(run_dir, test)
    probs = [p for r in test for p in s_test[r["id"]]]
    labels = [y for r in test for y in r["labels"]]
    pb = M.processbench([r["meta"]["first_error"] for r in test], [s_test[r["id"]] for r in test])
    s_bon = score(run_dir, bon)
    groups = {}
    for r in bon:
        groups.setdefault(r["meta"]["group"], []).append(
            (M.aggregate(s_bon[r["id"]], args.bon_aggregation), r["meta"]["first_error"] == -1))
    bo = M.best_of_n(groups)
    by_id = {r["id"]: r for r in read_jsonl(files["train_meta"])}  # training records and uniform_meta's extra
    w_rows = read_jsonl(run_dir / "instance_weights.jsonl")
    w, recs, dom_w, kind_w = [], [], {}, {}
    for row in w_rows:
        rec = by_id[row["id"]]
        wi = row["weight"]
        if wi is None:  # instance net: never trained on
            continue
        w.append(wi)
        recs.append(rec)
        dom_w.setdefault(rec["domain"], []).append(wi)
        kind = rec["meta"]["kind"] if rec["meta"]["corrupted"] else "clean"
        kind_w.setdefault(kind, []).append(wi)
    pooled, within = weight_aurocs(args, w, recs)
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {"step_auroc": M.auroc(probs, labels), "pb_f1": pb["f1"], "bon_acc": bo["selection"],
            "bon_random": bo["random"], "bon_oracle": bo["pass_at_n"],
            "weight_auroc": pooled, "weight_auroc_within": within,
            "domain_weight": {d: statistics.fmean(v) for d, v in dom_w.items()},
            "weights_by_kind": kind_w,
            "curves": {k: [(m["step"], m[k]) for m in metrics if m.get(k) is not None]
                       for k in ("meta_loss", "eval_step_auroc", "loss_unweighted")},
            "domain_over_time": domain_weights_over_time(run_dir, args.domains, train),
            "wall_s": wall_s(args, run_dir.name, run_dir)}


def domain_weights_over_time(run_dir: Path, domains: list[str], train: list[dict]) -> dict:
    """{domain: [(step, weight)]} from the checkpoints of a domain-table run (empty otherwise),
    each the weight the run used (dreamprm.weights.WeightTable: mean 1 over training instances)."""
    import torch
    from dreamprm.data.tokenize import domain_table
    from dreamprm.weights import build_weight_module

    names = domain_table(domains)
    table = build_weight_module("domain_table", [names.index(r["domain"]) for r in train], len(names), 1)
    out = {}
    for c in sorted((run_dir / CHECKPOINTS_DIR).glob("step_*")):
        st = torch.load(c / SHARED_STATE, weights_only=True)
        raw = st["weights"].get("raw")
        if raw is None or len(raw) != len(names):
            return {}
        table.raw.data.copy_(raw)
        for name, wi in zip(names, table.row_weights().tolist()):
            if name in domains:
                out.setdefault(name, []).append((st["step"], wi))
    return out


# ---------------------------------------------------------------- report


def spread(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(args, results: dict) -> dict:
    """results[method][seed] -> per-method mean and min..max of every metric."""
    table = {}
    for method, by_seed in results.items():
        rows = list(by_seed.values())
        t = {k: spread([r.get(k, math.nan) for r in rows])
             for k in ("step_auroc", "pb_f1", "bon_acc", "bon_random", "weight_auroc", "weight_auroc_within",
                       "wall_s")}
        t["domain_weight"] = {d: spread([r["domain_weight"].get(d, math.nan) for r in rows]) for d in args.domains}
        table[method] = t
    return table


def fmt(s: dict, nd=3) -> str:
    if not s["n"]:
        return "-"
    return f"{s['mean']:.{nd}f} ({s['min']:.{nd}f}..{s['max']:.{nd}f})"


GAP_METRICS = (("step_auroc", "step AUROC"), ("pb_f1", "ProcessBench F1"), ("bon_acc", "best-of-N acc"))


def gap_shares(results: dict, seed, reference: str) -> dict:
    """{method: {metric: share}} for one seed: (method - ref) / (oracle - ref), ref the uniform baseline
    (reference "baseline") or, per metric, the best of the baselines run (reference "best": the max over
    baseline, uniform_meta, loss_select). None where the gap is under 1e-9 (nothing to recover)."""
    out = {}
    for m, by_seed in results.items():
        if m in ("oracle", "proxy") or seed not in by_seed:
            continue
        out[m] = {}
        for k, _ in GAP_METRICS:
            refs = [results[b][seed][k] for b in (BASELINES if reference == "best" else ("baseline",))
                    if b in results and seed in results[b]]
            ref, top = (max(refs) if refs else math.nan), results["oracle"][seed][k]
            gap = top - ref
            out[m][k] = (by_seed[seed][k] - ref) / gap if abs(gap) > 1e-9 else None
    return out


def gap_table(args, results: dict, reference: str) -> list[str]:
    heads = [h.replace("best-of-N", f"best-of-{args.bon_n}") for _, h in GAP_METRICS]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    per_seed = {s: gap_shares(results, s, reference) for s in args.seeds}
    for m in per_seed[args.seeds[0]]:
        cells = [" / ".join("-" if (v := per_seed[s].get(m, {}).get(k)) is None or math.isnan(v) else f"{v:.2f}"
                            for s in args.seeds) for k, _ in GAP_METRICS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def describe_meta(args) -> str:
    """The meta-pass settings of the learned methods, each marked as dreamprm's default or the flag's."""
    given = meta_overrides(args)
    settings = meta_settings(args)
    if settings.get("meta_batch_size") == 0:  # dreamprm's default: the training micro-batch's size
        settings["meta_batch_size"] = f"{args.batch_size} (= --batch_size)"
    parts = [f"{k} {v}" + (" (--" + k + ")" if k in given else "") for k, v in settings.items()]
    return ("Meta pass of the learned methods: " + ", ".join(parts) + "; dreamprm's defaults "
            "(dreamprm.config.MetaConfig) unless a flag is named.")


def write_report(args, results: dict, table: dict, command: str) -> str:
    doms = [f"{d} ({k} {r:g})" if k != "none" else f"{d} (clean)" for d, k, r in
            zip(args.domains, args.kinds, args.rates)]
    lines = [f"Command: `{command}`", "",
             f"Seeds {', '.join(map(str, args.seeds))}; mean (min..max). Domains: {', '.join(doms)}.", "",
             f"PRM: hidden {args.hidden}, {args.layers} layers, {total_updates(args)} updates"
             + (f"; proxy: hidden {args.proxy_hidden}, {args.proxy_layers} layer(s), learning "
                f"{args.transfer_method} (the proxy row: that PRM itself; transfer: the PRM above trained with the "
                "proxy's weights fixed, its wall time both runs')" if "transfer" in results else "")
             + (f"; loss_select: a uniform warm-up of {warmup_updates(args)} updates, the {args.select_drop:g} "
                "of the training records with the highest loss under it weighted 0, then the full run from "
                "scratch (wall time both runs')" if "loss_select" in results else "")
             + ". Wall s: seconds of the run on this machine, with the other runs of the table beside it.", "",
             describe_meta(args), "",
             f"Best-of-{args.bon_n}: a pick is correct only when every step of the picked candidate is correct"
             + (" (half of the wrong candidates reach the right answer by two compensating slips, --bon_hard)"
                if args.bon_hard else "") + "; the random-pick row is the expected accuracy of a uniform pick.", "",
             "| method | step AUROC | ProcessBench F1 | best-of-%d acc | weight AUROC (clean vs corrupted) | "
             "weight AUROC within domain | wall s |" % args.bon_n, "|---|---|---|---|---|---|---|"]
    for m in results:
        t = table[m]
        lines.append(f"| {m} | {fmt(t['step_auroc'])} | {fmt(t['pb_f1'])} | {fmt(t['bon_acc'])} | "
                     f"{fmt(t['weight_auroc'])} | {fmt(t['weight_auroc_within'])} | {fmt(t['wall_s'], 0)} |")
    any_method = next(iter(table.values()))
    lines.append(f"| random pick | - | - | {fmt(any_method['bon_random'])} | - | - | - |")
    if "transfer" in results and args.transfer_method in results:
        a, b = table["transfer"], table[args.transfer_method]
        lines += ["", f"transfer - {args.transfer_method} on this PRM (mean over seeds): step AUROC "
                  f"{a['step_auroc']['mean'] - b['step_auroc']['mean']:+.3f}, ProcessBench F1 "
                  f"{a['pb_f1']['mean'] - b['pb_f1']['mean']:+.3f}, best-of-{args.bon_n} "
                  f"{a['bon_acc']['mean'] - b['bon_acc']['mean']:+.3f}; wall time "
                  f"{a['wall_s']['mean'] / b['wall_s']['mean']:.2f}x."]
    seeds = " / ".join(map(str, args.seeds))
    if "oracle" in results and "baseline" in results:
        lines += ["", f"Share of the uniform-to-oracle gap recovered, per seed {seeds}: (method - baseline) / "
                  "(oracle - baseline); - where the gap is 0:", ""] + gap_table(args, results, "baseline")
    if "oracle" in results and any(b in results for b in BASELINES):
        run = [b for b in BASELINES if b in results]
        lines += ["", f"Share of the gap recovered against the best baseline, per seed {seeds}: (method - best) / "
                  f"(oracle - best), best the max per metric and seed over {', '.join(run)}; below 0: worse than "
                  "a baseline:", ""] + gap_table(args, results, "best")
    lines += ["", "Mean learned weight per domain (weights have mean 1 over the training instances):", "",
              "| method | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
    for m in results:
        lines.append(f"| {m} | " + " | ".join(fmt(table[m]["domain_weight"][d], 2) for d in args.domains) + " |")
    any_run = next(iter(next(iter(results.values())).values()))
    lines += ["", f"Best-of-{args.bon_n}: random pick {any_run['bon_random']:.3f}, pass@N "
              f"{any_run['bon_oracle']:.3f} (seed {args.seeds[0]}).",
              "", f"Every number per seed (results.json) and the figures: `{shown(args.artifacts)}/`, "
              "rewritten from the finished runs by the command above with `--plot_only`."]
    return "\n".join(lines) + "\n"


COLORS = {"baseline": "0.4", "uniform_meta": "0.65", "loss_select": "C6", "instance_table": "C0",
          "instance_net": "C1", "domain_table": "C2",
          "instance_domain_table": "C3", "oracle": "k", "transfer": "C4", "proxy": "C5"}


def _curves(ax, results: dict, key: str) -> None:
    """Mean over seeds of a metrics.jsonl series per method, shaded min..max."""
    for m, by_seed in results.items():
        curves = [r["curves"][key] for r in by_seed.values() if r["curves"][key]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [s for s, _ in curves[0][:n]]
        cols = [[c[i][1] for c in curves] for i in range(n)]
        ax.plot(steps, [statistics.fmean(v) for v in cols], color=COLORS.get(m), label=m)
        ax.fill_between(steps, [min(v) for v in cols], [max(v) for v in cols], color=COLORS.get(m), alpha=0.15)
    ax.set_xlabel("PRM update")
    ax.legend(fontsize=7)


def _weights_hist(ax, res: dict, title: str) -> None:
    """Histogram of the learned weights of one run, clean instances and each corruption kind."""
    kw = res["weights_by_kind"]
    hi = max(max(v) for v in kw.values())
    bins = [hi * i / 40 for i in range(41)]
    for kind in ["clean"] + [k for k in KINDS if k != "none"]:
        if kind in kw:
            ax.hist(kw[kind], bins=bins, density=True, histtype="step", lw=1.6, label=f"{kind} ({len(kw[kind])})")
    ax.set_title(f"{title}: weight AUROC {res['weight_auroc']:.2f}", fontsize=9)
    ax.set_xlabel("learned instance weight")
    ax.legend(fontsize=7)


def _domain_weights(ax, args, runs: list[dict]) -> None:
    for j, (d, k, r) in enumerate(zip(args.domains, args.kinds, args.rates)):
        for i, res in enumerate(runs):
            c = res["domain_over_time"].get(d, [])
            if c:
                ax.plot([s for s, _ in c], [w for _, w in c], color=f"C{j}", alpha=0.8,
                        label=(f"{d} ({k} {r:g})" if k != "none" else f"{d} (clean)") if i == 0 else None)
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set_xlabel("PRM update")
    ax.set_ylabel("domain weight")
    ax.legend(fontsize=7)


def plot(args, results: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    seed = args.seeds[0]

    def save(fig, name):
        fig.tight_layout()
        paths.append(out / name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        write_atomic(paths[-1], buf.getvalue())
        plt.close(fig)

    # weight distributions by corruption kind, one panel per learned method (first seed)
    learned = [m for m in results if m not in ("baseline", "oracle", "uniform_meta")]
    if learned:
        fig, axes = plt.subplots(1, len(learned), figsize=(4.2 * len(learned), 3.4), squeeze=False)
        for ax, m in zip(axes[0], learned):
            _weights_hist(ax, results[m][seed], f"{m} (seed {seed})")
        axes[0][0].set_ylabel("density")
        save(fig, "weights_by_kind.png")

    # learning curves: meta loss (bilevel runs only) and clean-test AUROC per method
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    _curves(axes[0], results, "meta_loss")
    _curves(axes[1], results, "eval_step_auroc")
    axes[0].set_title("meta loss on clean meta batches (mean, min..max over seeds)", fontsize=9)
    axes[1].set_title("clean-test step AUROC (mean, min..max over seeds)", fontsize=9)
    save(fig, "learning_curves.png")

    if "domain_table" in results:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        _domain_weights(ax, args, list(results["domain_table"].values()))
        ax.set_title("domain table: weight per domain over training (each seed)", fontsize=9)
        save(fig, "domain_weights.png")

    # the main figure: test AUROC over training, instance weights, domain weights
    panels = ["auroc"] + (["table"] if "instance_table" in results else []) + \
        (["domain"] if "domain_table" in results else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, what in zip(axes[0], panels):
        if what == "auroc":
            _curves(ax, results, "eval_step_auroc")
            ax.set_title("clean-test step AUROC (mean, min..max over seeds)", fontsize=9)
        elif what == "table":
            _weights_hist(ax, results["instance_table"][seed], f"instance table (seed {seed})")
        else:
            _domain_weights(ax, args, list(results["domain_table"].values()))
            ax.set_title("domain table over training (each seed)", fontsize=9)
    save(fig, "main.png")
    return paths


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    csv = lambda f: (lambda s: [f(x) for x in s.split(",") if x != ""])  # noqa: E731
    g = p.add_argument_group("data")
    g.add_argument("--domains", type=csv(str), default="a,b,c,d", help="training domains, comma-separated")
    g.add_argument("--kinds", type=csv(str), default="none,none,flip,flip",
                   help=f"corruption kind per domain ({', '.join(KINDS)})")
    g.add_argument("--rates", type=csv(float), default="0,0,0.4,0.4", help="corruption rate per domain")
    g.add_argument("--n_train", type=int, default=150, help="training records per domain")
    g.add_argument("--n_meta", type=int, default=200, help="meta records (clean, outcome only)")
    g.add_argument("--n_test", type=int, default=300, help="clean test records (step labels)")
    g.add_argument("--n_bon_groups", type=int, default=100, help="best-of-N questions")
    g.add_argument("--bon_n", type=int, default=16, help="candidates per best-of-N question")
    g.add_argument("--bon_hard", action=argparse.BooleanOptionalAction, default=True,
                   help="half of the wrong best-of-N candidates reach the right answer by two compensating slips "
                        "(a pick counts only when every step is right)")
    g.add_argument("--bon_aggregation", default="min", help="step scores -> candidate score for best-of-N")
    g.add_argument("--wrong_frac", type=float, default=0.5, help="fraction of solutions with a slip")
    g.add_argument("--hard_frac", type=float, default=0.0,
                   help="fraction of the wrong training, meta and test solutions whose slip is compensated by a "
                        "second one (right final answer, wrong steps)")
    g.add_argument("--mc_rollouts", type=int, default=8, help="mc_soft: simulated completions per step")
    g.add_argument("--mc_skill", type=float, default=0.8,
                   help="mc_soft: probability that the completer gets one remaining step right")
    g.add_argument("--min_steps", type=int, default=3)
    g.add_argument("--max_steps", type=int, default=5)
    g.add_argument("--max_value", type=int, default=99, help="values of the chain stay in [0, max_value]")
    g.add_argument("--slips", default="odd", choices=("odd", "xor", "any"),
                   help="odd: wrong results are odd (a parity cue); xor: wrong results have the wrong parity "
                        "(parity of x XOR parity of d); any: off by 1-3 (needs addition)")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--intermediate", type=int, default=256)
    g.add_argument("--proxy_hidden", type=int, default=64, help="transfer: hidden width of the proxy PRM")
    g.add_argument("--proxy_layers", type=int, default=1, help="transfer: layers of the proxy PRM")
    g.add_argument("--transfer_method", default="instance_domain_table", choices=LEARNED,
                   help="transfer: the weights the proxy PRM learns")
    g = p.add_argument_group("training (the same for every method)")
    g.add_argument("--methods", type=csv(str), default=",".join(METHODS))
    g.add_argument("--seeds", type=csv(int), default="0,1,2")
    g.add_argument("--epochs", type=float, default=10.0, help="passes over the training set (sets total_steps)")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--select_warmup", type=int, default=None,
                   help="loss_select: updates of the uniform warm-up run (default: a third of the run's)")
    g.add_argument("--select_drop", type=float, default=0.3,
                   help="loss_select: fraction of the training records, highest warm-up loss first, weighted 0")
    g = p.add_argument_group("meta pass of the learned methods (default: not passed, dreamprm's own default)")
    g.add_argument("--meta_lr", type=float, default=None, help="weight-module learning rate, every learned method")
    g.add_argument("--hypergrad", default=None, choices=HYPERGRADS)
    g.add_argument("--aggregation", default=None, choices=AGGREGATIONS, help="meta-loss aggregation")
    g.add_argument("--fd_radius", type=float, default=None)
    g.add_argument("--table_optimizer", default=None, choices=TABLE_OPTIMIZERS, help="how table rows step")
    g.add_argument("--meta_warmup", type=int, default=None, help="updates with uniform weights before the first "
                   "meta pass")
    g.add_argument("--meta_batch_size", type=int, default=None)
    g.add_argument("--meta_interval", type=int, default=None)
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval_every", type=int, default=25, help="updates between clean-test evaluations")
    g.add_argument("--ckpt_every", type=int, default=25, help="checkpoint interval of domain-table runs")
    g.add_argument("--log_every", type=int, default=10)
    g = p.add_argument_group("running")
    g.add_argument("--work_dir", type=Path, default=Path("/tmp/dreamprm-reweighting"),
                   help="data and run directories (finished runs are reused)")
    g.add_argument("--out", type=Path, default=BENCH / "reweighting", help="results.md (the committed table)")
    g.add_argument("--artifacts", type=Path, default=None,
                   help="results.json and the figures (default: bench/out/<the --out path under bench/>, "
                        "ignored by git; --out itself when --out is outside bench/)")
    g.add_argument("--headline", action="store_true", help="also copy main.png beside results.md (to commit it)")
    g.add_argument("--jobs", type=int, default=2, help="training runs at once")
    g.add_argument("--threads", type=int, default=1, help="torch threads per run")
    g.add_argument("--plot_only", action="store_true", help="only re-read finished runs, rewrite table and figures")
    return p


def check_args(p, args) -> None:
    problems = []
    if not (len(args.domains) == len(args.kinds) == len(args.rates)):
        problems.append(f"--domains, --kinds, --rates need one entry per domain "
                        f"({len(args.domains)}, {len(args.kinds)}, {len(args.rates)} given)")
    problems += [f"--kinds: {k!r} is not one of {KINDS}" for k in args.kinds if k not in KINDS]
    problems += [f"--rates: {r} is not in [0, 1]" for r in args.rates if not 0 <= r <= 1]
    problems += [f"--methods: {m!r} is not one of {METHODS}" for m in args.methods if m not in METHODS]
    if "meta" in args.domains:
        problems.append("--domains: 'meta' is uniform_meta's domain of the meta records; name the domain otherwise")
    if "oracle" in args.methods and "none" not in args.kinds:
        problems.append("--methods oracle trains on the domains of kind none and --kinds has none; add a clean "
                        "domain or leave oracle out")
    if not 1 <= args.min_steps <= args.max_steps:
        problems.append("--min_steps and --max_steps: need 1 <= min_steps <= max_steps")
    if args.max_value < 10:
        problems.append("--max_value: at least 10")
    for flag, v, ok in (("--wrong_frac", args.wrong_frac, 0 <= args.wrong_frac <= 1),
                        ("--hard_frac", args.hard_frac, 0 <= args.hard_frac <= 1),
                        ("--mc_skill", args.mc_skill, 0 <= args.mc_skill <= 1),
                        ("--select_drop", args.select_drop, 0 <= args.select_drop < 1)):
        if not ok:
            problems.append(f"{flag}: {v} is out of range (" + ("[0, 1)" if flag == "--select_drop" else "[0, 1]")
                            + ")")
    for flag, v, low in (("--mc_rollouts", args.mc_rollouts, 1), ("--bon_n", args.bon_n, 1),
                         ("--select_warmup", args.select_warmup, 1), ("--meta_batch_size", args.meta_batch_size, 1),
                         ("--meta_interval", args.meta_interval, 1), ("--meta_warmup", args.meta_warmup, 0)):
        if v is not None and v < low:
            problems.append(f"{flag}: {v} is below {low}")
    for flag, v in (("--meta_lr", args.meta_lr), ("--fd_radius", args.fd_radius)):
        if v is not None and not v > 0:
            problems.append(f"{flag}: {v} must be > 0")
    if problems:
        p.error("; ".join(problems))


def artifacts_dir(out: Path) -> Path:
    """Where results.json and the figures go for --out: they are regenerated, so a committed
    place under bench/ gets its twin under the ignored bench/out/; elsewhere nothing is committed."""
    out = out.resolve()
    if not out.is_relative_to(BENCH) or out.relative_to(BENCH).parts[:1] == ("out",):
        return out
    return BENCH / "out" / out.relative_to(BENCH)


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def cost_line(args) -> str:
    """How many training runs the command launches (finished ones are reused), and their PRM updates."""
    names = {(s, name) for s in args.seeds for m in args.methods for name in runs_of(args, m)}
    todo = [(s, n) for s, n in names if not finished(args.work_dir / f"seed{s}" / n)]
    full, warm = total_updates(args), warmup_updates(args)
    updates = sum(warm if n == "loss_select-warmup" else full for _, n in todo)
    if args.plot_only:
        return f"cost: --plot_only trains nothing ({len(names) - len(todo)} of {len(names)} runs finished)"
    return (f"cost: {len(todo)} training runs to launch ({len(names)} in all, {len(names) - len(todo)} finished and "
            f"reused), {updates} PRM updates; {args.jobs} at once")


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    # finished runs are reused, so the command without --plot_only reproduces these results
    command = "python bench/reweighting.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--plot_only")
    args.work_dir = args.work_dir.resolve()
    args.out = args.out.resolve()
    args.artifacts = (args.artifacts or artifacts_dir(args.out)).resolve()
    from dreamprm.tiny import make_tiny_checkpoint

    model_dir = args.work_dir / f"model-h{args.hidden}-l{args.layers}"
    if not (model_dir / "config.json").is_file():
        make_tiny_checkpoint(model_dir, hidden=args.hidden, layers=args.layers, heads=args.heads,
                             kv_heads=max(1, args.heads // 2), intermediate=args.intermediate)
    proxy_dir = None
    if "transfer" in args.methods:
        proxy_dir = args.work_dir / f"model-h{args.proxy_hidden}-l{args.proxy_layers}"
        if not (proxy_dir / "config.json").is_file():
            make_tiny_checkpoint(proxy_dir, hidden=args.proxy_hidden, layers=args.proxy_layers, heads=args.heads,
                                 kv_heads=max(1, args.heads // 2), intermediate=2 * args.proxy_hidden)
    files = {s: generate(args, s, args.work_dir / f"seed{s}" / "data") for s in args.seeds}
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    print(cost_line(args), flush=True)
    if not args.plot_only:
        t0 = time.time()
        with ThreadPoolExecutor(args.jobs) as ex:
            list(ex.map(lambda ms: train_method(args, ms[0], ms[1], files[ms[1]], model_dir, proxy_dir), jobs))
        print(f"all runs trained in {time.time() - t0:.0f} s", flush=True)
    shown_as = list(args.methods) + (["proxy"] if "transfer" in args.methods else [])
    results = {m: {} for m in shown_as}
    for m in shown_as:
        for s in args.seeds:
            results[m][s] = evaluate_run(args, args.work_dir / f"seed{s}" / (proxy_name(args) if m == "proxy" else m),
                                         files[s])
    table = summarize(args, results)
    args.out.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    report = write_report(args, results, table, command)
    write_atomic(args.out / "results.md", report.encode())
    write_atomic(args.artifacts / "results.json", json.dumps(
        {"command": command, "table": table,
         "runs": {m: {str(s): {k: v for k, v in r.items() if k != "weights_by_kind"} for s, r in by.items()}
                  for m, by in results.items()}}, indent=1).encode())
    figs = plot(args, results, args.artifacts)
    if args.headline and args.out != args.artifacts:
        figs.append(args.out / "main.png")
        write_atomic(figs[-1], (args.artifacts / "main.png").read_bytes())
    print(report)
    print("figures: " + ", ".join(str(f) for f in figs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
