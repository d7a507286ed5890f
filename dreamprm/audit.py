"""`dreamprm weights RUN_DIR`: a run's learned weights, reported per source and domain, and used to filter its data.

    dreamprm weights runs/prm                                   # count, mean, quantiles; the 5 lowest and highest
    dreamprm weights runs/prm --top 20 --json                   # the same as JSON (questions and steps whole)
    dreamprm weights runs/prm --plot plots/                     # weights_<domain>.png, weight_spread.png
    dreamprm weights runs/prm --keep 0.8 --out clean.jsonl      # write the highest-weighted 80% of the records
    dreamprm weights runs/prm --min_weight 0.9 --out clean.jsonl

The weights are RUN_DIR/instance_weights.jsonl (the trainer writes it at each checkpoint and at the end),
matched by source and id to the records of the run's training sources (config.yaml data.train_file, read
again, so they must still be where the run read them). The report names the checkpoint they are from and warns
when it is not the run's newest intact one (data/learned.py: after a resume that fell back, until the next
save). Kept records are written in the internal format, in
training order, each with its learned weight in meta["weight"] and its training domain; ties at the --keep
cut go to the record earlier in training order.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreamprm.checkpoint import os_problem, write_atomic
from dreamprm.config import DEFAULT_STEP_TAG, Source
from dreamprm.data.learned import WEIGHTS_FILE, Learned, read_learned, run_sources_of, written_at
from dreamprm.data.mixing import read_sources
from dreamprm.data.record import Record, write_jsonl
from dreamprm.errors import WeightsError

QUANTILES = (("min", 0), ("10%", 10), ("50%", 50), ("90%", 90), ("max", 100))
WIDTH = 110  # characters of one question or step line in the text report
SHOWN = 20  # ids or problem lines named in one message


@dataclass
class Weighted:
    """One record of a training source with its learned weight (None: the run has none for it)."""
    record: Record
    source: str
    weight: float | None
    index: int | None  # its training index; None when instance_weights.jsonl has no row for it


@dataclass
class Run:
    path: Path
    status: dict
    weights_kind: str  # the weight module that learned them, or "fixed, transferred from X"
    weights_step: int | None  # the update of the checkpoint they are from (None: the file does not say)
    stale: str | None  # why they are not the weights of the run's newest intact checkpoint (Learned.stale)
    items: list[Weighted]  # every record of every training source, in source order then file order
    sources: list[Source]


def _some(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    return ", ".join(items[:SHOWN]) + (f" and {total - SHOWN} more" if total > SHOWN else "")


# ---------------------------------------------------------------- reading a run


def _training_records(learned: Learned) -> tuple[list[Source], list[list[Record]]]:
    """The run's training sources and their records as training read them (each source's domain= applied)."""
    cfg, cfg_path = learned.cfg, learned.cfg_path
    d = cfg.get("data", {})
    sources = run_sources_of(learned)
    missing = [s.path for s in sources if not Path(s.path).is_file()]
    if missing:
        raise WeightsError(f"{cfg_path}: data.train_file {', '.join(missing)}: no such file from here; the "
                           "weights are matched to the records the run trained on: run this from the directory the "
                           "run was started in (relative paths), or restore the files")
    step_tag = str(cfg.get("model", {}).get("step_tag") or DEFAULT_STEP_TAG)
    records, _, problems = read_sources(sources, [], step_tag, bool(d.get("skip_invalid", False)))
    if problems:
        raise WeightsError(f"{cfg_path}: the run's training data cannot be read as it was in training:\n  "
                           + "\n  ".join(problems[:SHOWN]))
    for s, recs in zip(sources, records):
        if s.domain is not None:
            for r in recs:
                r.domain = s.domain
    return sources, records


def match(rows: list[tuple[int, dict]], sources: list[Source], records: list[list[Record]], path: Path,
          allow_unweighted: bool) -> list[Weighted]:
    """Every training record with its row's weight. A row names its source, or (older runs) is matched by
    id to the first source, in training order, from the previous row's on: training indices run through
    the sources in order, so ids shared by two sources still find their own. WeightsError when the rows and
    the records do not fit (ids in no source, another domain, records without a row unless allow_unweighted)."""
    names = [s.name for s in sources]
    pos = [{r.id: k for k, r in enumerate(recs)} for recs in records]
    found: list[dict[int, tuple[float | None, int]]] = [{} for _ in sources]
    extra, moved, cur = [], [], 0
    for n, row in sorted(rows, key=lambda nr: nr[1]["index"]):
        rid = row["id"]
        if "source" in row:
            s = names.index(row["source"]) if row["source"] in names else None
            if s is not None and (rid not in pos[s] or pos[s][rid] in found[s]):
                s = None
        else:
            s = next((t for t in range(cur, len(sources)) if rid in pos[t] and pos[t][rid] not in found[t]), None)
        if s is None:
            extra.append(f"{rid!r} (line {n}" + (f", source {row['source']!r})" if "source" in row else ")"))
            continue
        cur, k = s, pos[s][rid]
        if (records[s][k].domain or None) != row["domain"]:
            moved.append(f"{rid!r} (line {n}: {row['domain']!r}, now {records[s][k].domain!r})")
        found[s][k] = (row["weight"], row["index"])
    unweighted = [f"{r.id!r} ({s.name})" for s, recs, f in zip(sources, records, found)
                  for k, r in enumerate(recs) if k not in f]
    problems = []
    if extra:
        problems.append(f"{len(extra)} rows name a record that is in no training source (or twice): {_some(extra)}")
    if moved:
        problems.append(f"{len(moved)} records had another domain in training: {_some(moved)}")
    if unweighted and not allow_unweighted:
        problems.append(f"{len(unweighted)} training records have no row: {_some(unweighted)}")
    if problems:
        where = ", ".join(s.path for s in sources)
        hint = ("the data changed since the run trained (restore the files it trained on), or the weights are from "
                "another run")
        if not (extra or moved):
            hint += ("; records left out of training (longer than --max_length: the training log's 'dropped') have "
                     "no weight: if that is all, pass --allow_unweighted (they are reported, and not kept)")
        raise WeightsError(f"{path} does not fit the run's training data ({where}):\n  " + "\n  ".join(problems)
                           + f"\n{hint}")
    return [Weighted(r, s.name, *found[i].get(k, (None, None)))
            for i, (s, recs) in enumerate(zip(sources, records)) for k, r in enumerate(recs)]


def load_run(run_dir, allow_unweighted: bool = False) -> Run:
    """A run directory's training records with their learned weights; WeightsError saying what is wrong
    (not a run directory, a baseline run, no weights yet, damaged weights, weights from other data)."""
    learned = read_learned(run_dir)
    sources, records = _training_records(learned)
    items = match(learned.rows, sources, records, learned.path, allow_unweighted)
    return Run(learned.path.parent, learned.status, learned.label, learned.step, learned.stale(), items, sources)


# ---------------------------------------------------------------- the report


def _stats(group: list[Weighted]) -> dict:
    ws = [it.weight for it in group if it.weight is not None]
    out = {"records": len(group), "weighted": len(ws)}
    if ws:
        a = np.asarray(ws, dtype=np.float64)
        out["mean"] = float(a.mean())
        out.update({name: float(np.percentile(a, q)) for name, q in QUANTILES})
    return out


def _entry(it: Weighted) -> dict:
    r = it.record
    return {"id": r.id, "source": it.source, "domain": r.domain, "weight": it.weight, "index": it.index,
            "question": r.question, "steps": r.steps, "labels": r.labels}


def report(run: Run, top: int) -> dict:
    """Per source and per domain: count, mean and quantiles of the learned weight; the top lowest and highest
    weighted records (ties in training order)."""
    weighted = [it for it in run.items if it.weight is not None]
    by_source = {s.name: _stats([it for it in run.items if it.source == s.name]) for s in run.sources}
    domains = sorted({it.record.domain or "(none)" for it in run.items})
    by_domain = {d: _stats([it for it in run.items if (it.record.domain or "(none)") == d]) for d in domains}
    return {"run_dir": str(run.path), "state": run.status.get("state"), "step": run.status.get("step"),
            "weights": run.weights_kind, "weights_file": str(run.path / WEIGHTS_FILE),
            "weights_step": run.weights_step, "warnings": [run.stale] if run.stale else [], **_stats(run.items),
            "by_source": by_source, "by_domain": by_domain,
            "lowest": [_entry(it) for it in sorted(weighted, key=lambda it: (it.weight, it.index))[:top]],
            "highest": [_entry(it) for it in sorted(weighted, key=lambda it: (-it.weight, it.index))[:top]]}


def _line(text: str) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= WIDTH else one[:WIDTH - 3] + "..."


def _label(y) -> str:
    return "-" if y is None else f"{y:g}"


def _stats_table(title: str, groups: dict) -> list[str]:
    head = [title, "n", "no weight", "mean", *(name for name, _ in QUANTILES)]
    rows = [[name, str(g["weighted"]), str(g["records"] - g["weighted"]),
             *([f"{g[k]:.4f}" for k in ("mean", *(q for q, _ in QUANTILES))] if g["weighted"] else
               ["-"] * (1 + len(QUANTILES)))] for name, g in groups.items()]
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(width[i]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r))
            for r in [head, *rows]]


def format_report(rep: dict) -> str:
    state = f"{rep['state']} at step {rep['step']}" if rep["state"] else "no status.json"
    lines = [f"run {rep['run_dir']} ({state}): weights {rep['weights']}, from {rep['weights_file']}, "
             f"{written_at(rep['weights_step'])}",
             f"{rep['records']} training records, {rep['weighted']} with a weight"
             + (f" (mean {rep['mean']:.4f})" if rep["weighted"] else ""), ""]
    lines += _stats_table("source", rep["by_source"]) + [""] + _stats_table("domain", rep["by_domain"])
    for what in ("lowest", "highest"):
        lines += ["", f"{len(rep[what])} {what} weighted"]
        for e in rep[what]:
            lines.append(f"  {e['weight']:.4f}  {e['id']}  (source {e['source']}, domain {e['domain']})")
            lines.append(f"      question: {_line(e['question'])}")
            lines += [f"      step {k + 1} [{_label(y)}]: {_line(s)}" for k, (s, y) in
                      enumerate(zip(e["steps"], e["labels"]))]
    if "filter" in rep:
        f = rep["filter"]
        lines += ["", f"keep {f['rule']}: {f['kept']} kept, {f['dropped']} dropped"]
        lines += [f"  source {name}: {g['kept']} kept, {g['dropped']} dropped of {g['records']}"
                  + (f" ({g['no_weight']} without a weight)" if g["no_weight"] else "")
                  for name, g in f["by_source"].items()]
        lines.append(f"wrote {f['kept']} records to {f['out']} (learned weight in meta.weight)" if f.get("out")
                     else "no --out: nothing written")
    for p in rep.get("plots", []):
        lines.append(f"wrote {p}")
    lines += rep.get("plot_notes", [])
    return "\n".join(lines)


# ---------------------------------------------------------------- the filter


def select(run: Run, keep: float | None = None, min_weight: float | None = None) -> tuple[list[Weighted], dict]:
    """The kept records in training order, and what was kept and dropped per source. --keep F keeps the
    ceil(F * n) highest-weighted of the n records with a weight; --min_weight W those weighted W or more.
    Records without a weight are never kept."""
    weighted = [it for it in run.items if it.weight is not None]
    if keep is not None:
        n = math.ceil(keep * len(weighted) - 1e-9)
        chosen = sorted(weighted, key=lambda it: (-it.weight, it.index))[:n]
        rule = f"the highest-weighted {keep:g} ({n} of {len(weighted)} weighted records)"
    else:
        chosen = [it for it in weighted if it.weight >= min_weight]
        rule = f"weight >= {min_weight:g}"
    ids = {id(it) for it in chosen}
    kept = [it for it in run.items if id(it) in ids]
    by_source = {}
    for s in run.sources:
        group = [it for it in run.items if it.source == s.name]
        k = sum(id(it) in ids for it in group)
        by_source[s.name] = {"records": len(group), "kept": k, "dropped": len(group) - k,
                             "no_weight": sum(it.weight is None for it in group)}
    return kept, {"rule": rule, "kept": len(kept), "dropped": len(run.items) - len(kept),
                  "min_kept_weight": min((it.weight for it in kept), default=None), "by_source": by_source}


def write_kept(kept: list[Weighted], out: Path) -> None:
    """The kept records, internal format, learned weight in meta["weight"] (an existing one is replaced)."""
    seen, twice = {}, []
    for it in kept:
        if it.record.id in seen and seen[it.record.id] != it.source:
            twice.append(f"{it.record.id!r} ({seen[it.record.id]}, {it.source})")
        seen.setdefault(it.record.id, it.source)
    if twice:
        raise WeightsError(f"--out {out}: {len(twice)} kept records of different sources share an id: {_some(twice)}; "
                           "one file needs unique ids: give the records distinct ids in their source files")
    recs = [dataclasses.replace(it.record, meta={**it.record.meta, "weight": it.weight}) for it in kept]
    try:
        write_jsonl(recs, out)
    except OSError as e:
        raise WeightsError(f"--out {out}: cannot write: {os_problem(e)}") from None


# ---------------------------------------------------------------- plots


def _metrics_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The metrics.jsonl rows with weight statistics, and notes (no file, unreadable lines: a running run's
    last line may be half written)."""
    if not path.is_file():
        return [], [f"{path}: missing: no weight_spread.png"]
    rows, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(str(n))
            continue
        if isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in
                                         ("step", "w_mean", "w_std", "w_min", "w_max")):
            rows.append(row)
    notes = [f"{path}: skipped unreadable lines {', '.join(bad)}"] if bad else []
    if not rows:
        notes.append(f"{path}: no weight statistics (w_mean, w_std, w_min, w_max; the instance net logs none): "
                     "no weight_spread.png")
    return rows, notes


def write_plots(run: Run, out_dir: Path) -> tuple[list[str], list[str]]:
    """weights_<domain>.png (a histogram of the domain's learned weights) and weight_spread.png (mean, std,
    min and max of the weights over training, from metrics.jsonl); (paths written, notes)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"--plot {out_dir}: cannot create: {os_problem(e)}") from None
    written, names = [], set()

    def save(fig, stem):
        name = stem
        while name in names:  # two domains whose names differ only in characters left out of a file name
            name += "_"
        names.add(name)
        path = out_dir / f"{name}.png"
        try:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
            write_atomic(path, buf.getvalue())
        except OSError as e:
            raise WeightsError(f"--plot {out_dir}: cannot write {path.name}: {os_problem(e)}") from None
        written.append(str(path))

    every = [it.weight for it in run.items if it.weight is not None] or [1.0]
    lo, hi = min(every), max(every)
    pad = max(0.05 * (hi - lo), 0.05)  # one x range for every domain, so that their histograms compare
    for domain in sorted({it.record.domain or "(none)" for it in run.items}):
        ws = [it.weight for it in run.items if (it.record.domain or "(none)") == domain and it.weight is not None]
        if not ws:
            continue
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.hist(ws, bins=30, range=(lo - pad, hi + pad), color="C0", alpha=0.8)
        ax.axvline(float(np.mean(ws)), color="k", linestyle="--", label=f"mean {np.mean(ws):.3f}")
        ax.set_xlabel("learned weight")
        ax.set_ylabel("records")
        ax.set_title(f"domain {domain}: {len(ws)} records")
        ax.legend()
        save(fig, "weights_" + re.sub(r"[^A-Za-z0-9._-]", "_", domain))

    rows, notes = _metrics_rows(run.path / "metrics.jsonl")
    if rows:
        step = [r["step"] for r in rows]
        mean, std = np.array([r["w_mean"] for r in rows]), np.array([r["w_std"] for r in rows])
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        ax.fill_between(step, [r["w_min"] for r in rows], [r["w_max"] for r in rows], color="C0", alpha=0.2,
                        label="min to max")
        ax.fill_between(step, mean - std, mean + std, color="C0", alpha=0.4, label="mean +- std")
        ax.plot(step, mean, color="C0", label="mean")
        ax.set_xlabel("update")
        ax.set_ylabel("learned weight")
        ax.set_title(f"weight spread over training ({run.weights_kind})")
        ax.legend()
        save(fig, "weight_spread")
    return written, notes


# ---------------------------------------------------------------- the command


def flag_problems(args) -> list[str]:
    out = []
    if args.top < 0:
        out.append(f"--top {args.top}: must be >= 0")
    if args.keep is not None and not 0 < args.keep <= 1:
        out.append(f"--keep {args.keep}: must be in (0, 1], the fraction of the records to keep (e.g. 0.8)")
    if args.min_weight is not None and not (math.isfinite(args.min_weight) and args.min_weight >= 0):
        out.append(f"--min_weight {args.min_weight}: must be a finite number >= 0")
    if args.keep is not None and args.min_weight is not None:
        out.append("--keep and --min_weight: give one of them (a fraction to keep, or a least weight)")
    if args.out:
        out_path = Path(args.out).expanduser()
        if args.keep is None and args.min_weight is None:
            out.append(f"--out {args.out}: needs --keep F or --min_weight W to say which records to write")
        if out_path.is_dir():
            out.append(f"--out {args.out}: is a directory; give a file path (e.g. {out_path / 'clean.jsonl'})")
        elif not out_path.parent.is_dir():
            out.append(f"--out {args.out}: the folder {out_path.parent} does not exist")
    if args.plot:
        if Path(args.plot).expanduser().exists() and not Path(args.plot).expanduser().is_dir():
            out.append(f"--plot {args.plot}: exists and is not a directory")
        if importlib.util.find_spec("matplotlib") is None:
            out.append("--plot needs matplotlib: pip install 'dreamprm[plot]'")
    return out


def weights(args) -> dict:
    """The report (with the filter's summary and the plots written) for parsed `dreamprm weights` flags."""
    problems = flag_problems(args)
    if problems:
        raise WeightsError("\n".join(problems))
    run = load_run(args.run_dir, args.allow_unweighted)
    rep = report(run, args.top)
    if args.keep is not None or args.min_weight is not None:
        kept, rep["filter"] = select(run, args.keep, args.min_weight)
        if args.out:
            out = Path(args.out).expanduser()
            used = [s.path for s in run.sources if Path(s.path).resolve() == out.resolve()]
            if used:
                raise WeightsError(f"--out {args.out}: is the run's training file {used[0]}; write the kept records "
                                   "to another path")
            write_kept(kept, out)
            rep["filter"]["out"] = str(out)
    if args.plot:
        rep["plots"], rep["plot_notes"] = write_plots(run, Path(args.plot).expanduser())
    return rep


def run_weights(args) -> int:
    """CLI handler: 0 on success, 1 with the reason on stderr."""
    try:
        rep = weights(args)
    except WeightsError as e:
        print(f"dreamprm weights: {e}", file=sys.stderr)
        return 1
    for w in rep["warnings"]:
        print(f"dreamprm weights: warning: {w}", file=sys.stderr)
    print(json.dumps(rep, indent=1, ensure_ascii=False) if args.json else format_report(rep))
    return 0


def add_weights_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("weights", help="report a run's learned weights; filter its data by them",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (the --output_dir of a training run)")
    p.add_argument("--top", type=int, default=5, metavar="K",
                   help="show the K lowest and K highest weighted records (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (questions and steps whole)")
    p.add_argument("--plot", metavar="DIR", help="write weights_<domain>.png and weight_spread.png here "
                   "(needs matplotlib: pip install 'dreamprm[plot]')")
    p.add_argument("--keep", type=float, metavar="F", help="keep the highest-weighted fraction F in (0, 1] of the "
                   "records (with --out: write them; without: say what would be dropped)")
    p.add_argument("--min_weight", "--min-weight", type=float, metavar="W",
                   help="keep the records with a learned weight >= W")
    p.add_argument("--out", metavar="FILE", help="write the kept records here (internal JSONL, learned weight "
                   "in meta.weight)")
    p.add_argument("--allow_unweighted", "--allow-unweighted", action="store_true",
                   help="accept training records without a learned weight (left out of training, e.g. longer "
                        "than --max_length): reported, never kept")
    p.set_defaults(handler=run_weights)
    return p
