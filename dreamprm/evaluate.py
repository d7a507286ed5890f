"""`dreamprm evaluate {steps,processbench,bon}`: score solutions with a PRM and report metrics.

Scores come from a checkpoint (--model) or from a JSONL file written earlier or by another
system (--scores, one line per solution: {"id": ..., "scores": [p1, p2, ...]}, one
probability per step), so a run can be repeated without the model or compared with others.

  dreamprm evaluate processbench --data realdata/processbench/*.json --from processbench \\
      --scores scores.jsonl --out report.json --plot plots/
  dreamprm evaluate steps --data val.jsonl --model runs/prm --save-scores s.jsonl  # run dir or export
  dreamprm evaluate bon --data example_model_solutions.jsonl --from gsm8k_candidates --scores s.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

from dreamprm import metrics as M
from dreamprm.checkpoint import write_atomic
from dreamprm.config import AGGREGATIONS, DEFAULT_STEP_TAG, FORMAT_CHOICES
from dreamprm.data.readers import file_problem, load_records, parse_json
from dreamprm.errors import DataError, DreamPRMError, EvalError

TASKS = {
    "steps": "step-level AUROC, F1 and calibration against step labels (and solution AUROC "
             "against outcomes per aggregation)",
    "processbench": "ProcessBench first-error F1 per split (one --data file per split) and their average",
    "bon": "best-of-N selection accuracy per aggregation against random, majority vote and pass@N "
           "(candidates grouped by meta.group)",
}
MAX_LISTED = 5  # ids named in a "these are missing" message; the count is always given
MAX_SHOWN = 50  # problem lines printed; the count of the rest is always given


def _listing(problems, where: str) -> str:
    shown = problems[:MAX_SHOWN]
    if len(problems) > MAX_SHOWN:
        shown.append(f"... and {len(problems) - MAX_SHOWN} more")
    return f"{len(problems)} problem(s) {where}:\n  " + "\n  ".join(shown)


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `evaluate` and its three tasks to a `dreamprm` subparsers object."""
    p = subparsers.add_parser("evaluate", help="evaluate a PRM (or saved scores) on labelled data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    for name, help_ in TASKS.items():
        t = tasks.add_parser(name, help=help_, description=help_)
        t.add_argument("--data", nargs="+", required=True, metavar="FILE",
                       help="data file(s); for processbench one file per split")
        t.add_argument("--from", dest="fmt", default="auto", choices=FORMAT_CHOICES,
                       help="input format of --data (default: guessed from the first record's keys)")
        t.add_argument("--skip-invalid", action="store_true",
                       help="leave out invalid records (the reader names them in a warning) "
                            "instead of failing")
        t.add_argument("--step-tag", default=None,
                       help="step tag (default: the one recorded with --model, else <extra_0>); it must not occur "
                            "inside step text")
        src = t.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", metavar="PATH",
                         help="PRM to score the data with: a run directory (its latest complete checkpoint), "
                              "a checkpoint folder (RUN/checkpoints/step_N) or a `dreamprm export` folder")
        src.add_argument("--scores", metavar="FILE",
                         help='JSONL of saved scores, one {"id": ..., "scores": [p1, ...]} per solution')
        t.add_argument("--batch-size", type=int, default=8, help="scoring batch size with --model")
        t.add_argument("--save-scores", "--save_scores", metavar="FILE",
                       help="with --model: also write the scores as the JSONL that --scores reads")
        t.add_argument("--max-length", "--max_length", type=int, metavar="N",
                       help="with --model: longest solution in tokens (default: the model's limit, its "
                            "max_position_embeddings, with a note when that is above the length it was trained "
                            "at; never more than the limit)")
        t.add_argument("--limit", type=int, metavar="N",
                       help="with --model: score and evaluate only the first N records of each --data file (a quick "
                            "look without a hand-made subset file)")
        t.add_argument("--too-long", "--too_long", choices=("error", "cut", "skip"), default="error",
                       help="with --model, a solution longer than max_length: error (default) lists them; cut "
                            "scores the steps that fit (as training cuts) and evaluates that prefix; skip leaves "
                            "it out. Cut and skipped solutions are counted and listed")
        if name in ("steps", "processbench"):
            t.add_argument("--threshold", type=float, default=0.5,
                           help="a step is predicted wrong when its score is strictly below this")
            t.add_argument("--n-bins", type=int, default=10, help="calibration bins (default %(default)s)")
        if name in ("steps", "bon"):
            t.add_argument("--aggregations", nargs="+", choices=AGGREGATIONS, default=list(AGGREGATIONS),
                           metavar="AGG",
                           help=f"solution scores to compare: {' '.join(AGGREGATIONS)} (default all)")
        if name == "processbench":
            t.add_argument("--split-by", choices=("file", "domain"), default="file",
                           help="a split is one --data file (default) or one record domain")
        t.add_argument("--out", metavar="FILE", help="write the report as JSON here")
        t.add_argument("--plot", metavar="DIR", help="write PNG plots here (needs matplotlib)")
        t.set_defaults(handler=run_evaluate)
    return p


def run_evaluate(args) -> int:
    """Entry point for the CLI: 0 on success, 1 with every problem on stderr."""
    try:
        evaluate(args)
    except DreamPRMError as e:
        print(f"dreamprm evaluate {args.task}: {e}", file=sys.stderr)
        return 1
    return 0


def evaluate(args) -> dict:
    """Run one task from parsed arguments; prints a table and returns the report."""
    _check_args(args)
    args.model_step_tag = args.step_tag  # None: the tag recorded with the model
    files = load_data(args.data, args.fmt, args.step_tag or DEFAULT_STEP_TAG, args.skip_invalid)
    if args.limit is not None:
        files = [(p, recs[:args.limit]) for p, recs in files]
    records = [r for _, recs in files for r in recs]
    if args.scores:
        scores = read_scores(args.scores, records)
    else:
        from dreamprm.scoring import load_scorer  # needs torch and a model; not for --scores
        scorer = load_scorer(args.model, step_tag=args.model_step_tag, max_length=args.max_length)
        trained = scorer.max_length  # without --max-length: the trained length, capped at the model's limit
        if args.max_length is None and scorer.model_limit and scorer.model_limit > trained:
            # a model trained short (every CPU smoke) still scores the solutions it can take; say it is beyond
            scorer.max_length = scorer.model_limit
            print(f"max_length {scorer.max_length} (the model's limit); it was trained at {trained} tokens, so "
                  f"longer solutions are scored beyond its training length (--max-length {trained} keeps to it)")
        else:
            print(f"max_length {scorer.max_length} (model limit {scorer.model_limit})")
        if args.too_long != "error":
            files, too_long = fit_files(scorer, files, args.too_long)
            records = [r for _, recs in files for r in recs]
        raw = scorer.score_records(records, args.batch_size)
        if args.save_scores:
            write_scores(raw, args.save_scores)
            print(f"scores: {args.save_scores} ({len(raw)} solutions)")
        entries = [(f"model {args.model}", rid, s) for rid, s in raw.items()]
        scores, problems = check_scores(entries, records, f"model {args.model}")
        if problems:
            raise EvalError(_listing(problems, "in the model's scores"))
    task = {"steps": eval_steps, "processbench": eval_processbench, "bon": eval_bon}[args.task]
    metrics, plot_data = task(files, scores, args)
    report = {"task": args.task,
              "inputs": {"data": [str(p) for p in args.data], "format": args.fmt,
                         "records": {str(p): len(recs) for p, recs in files},
                         "scores": args.scores, "model": args.model},
              "threshold": getattr(args, "threshold", None), "metrics": metrics}
    if args.model:
        report["inputs"]["max_length"] = scorer.max_length
        if args.too_long != "error":
            report["inputs"]["too_long"] = too_long
    if getattr(args, "aggregations", None):
        report["aggregations"] = list(args.aggregations)
    if args.plot:
        report["plots"] = write_plots(args.task, plot_data, metrics, Path(args.plot),
                                      getattr(args, "threshold", None))
    print_table(args.task, metrics)
    if args.out:
        write_output("--out", args.out, (json.dumps(_no_nan(report), indent=2) + "\n").encode("utf-8"))
        print(f"report: {args.out}")
    return report


def write_output(flag: str, path, data: bytes) -> None:
    """Write one output file whole or not at all (its folder made first); EvalError naming the flag."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EvalError(f"{flag} {path}: a parent of it is a file, not a folder") from None
    except OSError as e:
        raise EvalError(f"{flag} {path}: cannot create its folder {path.parent}: {e.strerror or e}") from None
    try:
        write_atomic(path, data)
    except OSError as e:
        raise EvalError(f"{flag}: {e.strerror or e}") from None


def _check_args(args) -> None:
    problems = []
    if not 0.0 <= getattr(args, "threshold", 0.5) <= 1.0:
        problems.append(f"--threshold {args.threshold}: must be in [0, 1]")
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: must be >= 1")
    if getattr(args, "n_bins", 1) < 1:
        problems.append(f"--n-bins {args.n_bins}: must be >= 1")
    problems += [f"--data {bad}" for bad in map(file_problem, args.data) if bad]
    if args.scores and (bad := file_problem(args.scores)):
        problems.append(f"--scores {bad}")
    for flag, path in (("--out", args.out), ("--save-scores", args.save_scores)):
        if path and Path(path).is_dir():
            problems.append(f"{flag} {path}: is a directory; name a file")
    if args.plot and Path(args.plot).exists() and not Path(args.plot).is_dir():
        problems.append(f"--plot {args.plot}: is a file; name a folder for the PNG plots")
    if args.model and not Path(args.model).exists():
        problems.append(f"--model {args.model}: no such file or directory")
    if args.max_length is not None and args.max_length < 1:
        problems.append(f"--max-length {args.max_length}: must be >= 1")
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit {args.limit}: must be >= 1 (records per --data file)")
    for flag, given in (("--max-length", args.max_length is not None), ("--too-long", args.too_long != "error"),
                        ("--limit", args.limit is not None)):
        if given and not args.model:
            problems.append(f"{flag}: is for --model (saved --scores are used as they are)")
    if args.save_scores and not args.model:
        problems.append("--save-scores: is for --model (with --scores the scores are in a file already)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        problems.append("--plot needs matplotlib: pip install 'dreamprm[plot]'")
    if problems:
        raise EvalError(_listing(problems, "in the arguments"))


def fit_files(scorer, files, how: str) -> tuple[list[tuple[str, list]], dict]:
    """The --data records cut or skipped to the scorer's max_length (Scorer.fit_to_length),
    with the counts and ids printed and returned for the report."""
    out, cut, skipped = [], {}, []
    for path, recs in files:
        kept, c, s = scorer.fit_to_length(recs, how)
        out.append((path, kept))
        cut.update(c)
        skipped += s
    n = sum(len(recs) for _, recs in files)
    print(f"too long for max_length {scorer.max_length}: {len(cut)} of {n} solutions cut at a step boundary, "
          f"{len(skipped)} skipped")
    if cut:
        print("  cut (steps kept/steps): " + ", ".join(f"{i} ({k}/{t})" for i, (k, t) in list(cut.items())[:20])
              + (f" and {len(cut) - 20} more (--out writes them all)" if len(cut) > 20 else ""))
    if skipped:
        print("  skipped: " + ", ".join(skipped[:20])
              + (f" and {len(skipped) - 20} more (--out writes them all)" if len(skipped) > 20 else ""))
    if not any(recs for _, recs in out):
        raise EvalError(f"no solution fits in max_length {scorer.max_length}")
    return out, {"how": how, "cut": {i: list(kt) for i, kt in cut.items()}, "skipped": skipped}


def load_data(paths, fmt: str, step_tag: str, skip_invalid: bool = False) -> list[tuple[str, list]]:
    """Read every --data file; ids must be unique over all of them (scores are keyed by id)."""
    files, problems, seen = [], [], {}
    for path in paths:
        try:
            recs = load_records(path, fmt=fmt, step_tag=step_tag, skip_invalid=skip_invalid)
        except DataError as e:
            problems += e.problems
            continue
        for r in recs:
            if r.id in seen:
                problems.append(f"{path}: id {r.id!r} also in {seen[r.id]}; "
                                "ids must be unique over all --data")
            seen.setdefault(r.id, path)
        files.append((str(path), recs))
    if problems:
        raise EvalError(_listing(problems, "in the data"))
    return files


def write_scores(scores: dict[str, list[float]], path) -> None:
    """The JSONL read_scores reads, one {"id", "scores"} line per solution; written whole or not at all."""
    text = "".join(json.dumps({"id": rid, "scores": s}) + "\n" for rid, s in scores.items())
    write_output("--save-scores", path, text.encode("utf-8"))


def read_scores(path, records) -> dict[str, list[float]]:
    """Read a scores JSONL and check it against the records; raises EvalError with all problems."""
    entries, problems, first_line = [], [], {}
    try:
        lines = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")
    except OSError as e:
        raise EvalError(f"--scores {path}: cannot read: {e.strerror or e}") from None
    if not any(line.strip() for line in lines):
        raise EvalError(f"--scores {path}: is empty (no scores)")
    for ln, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{ln}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{where}: line: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "re-encode the file as UTF-8")
            continue
        d, bad = parse_json(line)  # "line: ..." or the field
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        if not isinstance(d, dict) or "id" not in d or "scores" not in d:
            problems.append(f'{where}: expected an object {{"id": ..., "scores": [p1, p2, ...]}}')
            continue
        rid = d["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            problems.append(f"{where}: id: {rid!r} is not a string")
            continue
        rid = str(rid)
        if rid in first_line:
            problems.append(f"{where}: id {rid!r} is duplicated (first on line {first_line[rid]})")
            continue
        first_line[rid] = ln
        entries.append((where, rid, d["scores"]))
    scores, more = check_scores(entries, records, path)
    problems += more
    if problems:
        raise EvalError(_listing(problems, "in the scores"))
    return scores


def check_scores(entries, records, source) -> tuple[dict[str, list[float]], list[str]]:
    """Match (where, id, scores) entries to records: every id known, every record scored,
    one probability per step. Returns the scores by id and the problems found."""
    n_steps = {r.id: len(r.steps) for r in records}
    out, problems, unknown = {}, [], []
    for where, rid, s in entries:
        if rid not in n_steps:
            unknown.append((where, rid))
            continue
        if not isinstance(s, list):
            problems.append(f"{where}: id {rid!r}: scores must be a list of numbers, got {type(s).__name__}")
            continue
        bad = [f"scores[{k}]={v!r}" for k, v in enumerate(s) if _not_prob(v)]
        if bad:
            problems.append(f"{where}: id {rid!r}: not a number in [0, 1]: {', '.join(bad)}")
        if len(s) != n_steps[rid]:
            problems.append(f"{where}: id {rid!r}: expected {n_steps[rid]} scores (one per step), "
                            f"got {len(s)}")
        if not bad and len(s) == n_steps[rid]:
            out[rid] = [float(v) for v in s]
    if len(unknown) > MAX_LISTED:  # e.g. the scores of every split used with one split's data
        first = ", ".join(f"{r!r} at {w}" for w, r in unknown[:MAX_LISTED])
        problems.insert(0, f"{source}: {len(unknown)} scored ids are not in the data (drop them or add "
                        f"their --data files), first: {first}")
    else:
        problems[:0] = [f"{w}: id {r!r} is not in the data" for w, r in unknown]
    scored = {rid for _, rid, _ in entries}
    missing = [r.id for r in records if r.id not in scored]
    if missing:
        problems.append(_some_ids(source, missing, f"of {len(records)} records have no scores"))
    return out, problems


def _some_ids(where, ids, what) -> str:
    """One line for many records with the same problem: the count and the first few ids."""
    more = f" (and {len(ids) - MAX_LISTED} more)" if len(ids) > MAX_LISTED else ""
    return f"{where}: {len(ids)} {what}: " + ", ".join(repr(i) for i in ids[:MAX_LISTED]) + more


def _not_prob(v) -> bool:
    return (isinstance(v, bool) or not isinstance(v, (int, float))
            or not math.isfinite(v) or not 0.0 <= v <= 1.0)


def _labelled_steps(records, scores):
    """(score, label) over all labelled steps."""
    return [(p, y) for r in records for p, y in zip(scores[r.id], r.labels) if y is not None]


def _step_metrics(pairs, args) -> dict:
    s = [p for p, _ in pairs]
    y = [yy for _, yy in pairs]
    return {"n_labelled_steps": len(pairs), "auroc": M.auroc(s, y),
            "f1_error": M.f1_at(s, y, args.threshold, positive="error"),
            "calibration": M.ece(s, y, args.n_bins)}


def eval_steps(files, scores, args):
    """Step AUROC / error F1 / calibration over labelled steps; solution AUROC per aggregation."""
    records = [r for _, recs in files for r in recs]
    pairs = _labelled_steps(records, scores)
    with_outcome = [r for r in records if r.outcome is not None]
    if not pairs and not with_outcome:
        raise EvalError("the data has neither step labels nor outcomes; nothing to evaluate")
    metrics = {"n_records": len(records), "n_steps": sum(len(r.steps) for r in records)}
    metrics.update(_step_metrics(pairs, args))
    outcomes = [r.outcome for r in with_outcome]
    metrics["solution_auroc"] = {
        how: M.auroc([M.aggregate(scores[r.id], how) for r in with_outcome], outcomes)
        for how in args.aggregations}
    metrics["n_with_outcome"] = len(with_outcome)
    return metrics, {"pairs": pairs}


def eval_processbench(files, scores, args):
    """ProcessBench per split and the average F1, plus step metrics over the judged steps."""
    splits, problems = {}, []
    stems = [Path(p).stem for p, _ in files]
    for (path, recs), stem in zip(files, stems):
        unknown = []
        for r in recs:
            fe = M.first_error_index(r.labels)
            if any(y is None for y in (r.labels if fe == -1 else r.labels[:fe])):
                unknown.append(r.id)
            elif isinstance(r.meta.get("first_error"), int) and r.meta["first_error"] != fe:
                problems.append(f"{path}: id {r.id!r}: labels give first error {fe} but meta.first_error "
                                f"is {r.meta['first_error']}")
            if args.split_by == "domain":
                name = r.domain or "(no domain)"
            else:
                name = stem if stems.count(stem) == 1 else path
            splits.setdefault(name, []).append((fe, scores[r.id]))
        if unknown:
            problems.append(_some_ids(path, unknown, "records have an unlabelled step before the first "
                                      "error, so the first-error index is unknown"))
    if problems:
        raise EvalError(_listing(problems, "in the data for processbench"))
    per_split = {name: M.processbench([fe for fe, _ in rows], [s for _, s in rows], args.threshold)
                 for name, rows in splits.items()}
    records = [r for _, recs in files for r in recs]
    pairs = _labelled_steps(records, scores)
    metrics = {"splits": per_split, "average_f1": M.average_f1(per_split),
               "steps": _step_metrics(pairs, args)}
    return metrics, {"pairs": pairs}


def eval_bon(files, scores, args):
    """Best-of-N per aggregation; random, majority and pass@N do not depend on the scores."""
    groups, problems = {}, []
    for path, recs in files:
        no_group = [r.id for r in recs if "group" not in r.meta]
        no_outcome = [r.id for r in recs if r.outcome is None]
        if no_group:
            problems.append(_some_ids(path, no_group, "records have no meta.group (the problem they answer)"))
        if no_outcome:
            problems.append(_some_ids(path, no_outcome, "records have no outcome (whether they are correct)"))
        for r in recs:
            groups.setdefault(str(r.meta.get("group")), []).append(r)
    if problems:
        raise EvalError(_listing(problems, "in the data (bon needs candidates grouped by problem, "
                                           "with outcomes)"))

    def answer(r):
        a = r.meta.get("answer")
        return None if a is None else str(a)

    per_agg = {how: M.best_of_n({g: [(M.aggregate(scores[r.id], how), r.outcome, answer(r)) for r in rs]
                                 for g, rs in groups.items()})
               for how in args.aggregations}
    any_ = next(iter(per_agg.values()))
    metrics = {"selection": {how: res["selection"] for how, res in per_agg.items()},
               **{k: any_[k] for k in ("random", "majority", "pass_at_n", "n_groups", "mean_n")}}
    return metrics, {}


def _fmt(x, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}" if pct else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _table(header, rows) -> str:
    cols = [header] + [[str(c) for c in row] for row in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in cols]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _step_rows(m) -> list:
    f = m["f1_error"]
    return [["labelled steps", m["n_labelled_steps"]], ["step AUROC", _fmt(m["auroc"])],
            [f"error F1 @ {f['threshold']}", _fmt(f["f1"])], ["error precision", _fmt(f["precision"])],
            ["error recall", _fmt(f["recall"])], ["step accuracy", _fmt(f["accuracy"])],
            ["ECE", _fmt(m["calibration"]["ece"])]]


def print_table(task, m) -> None:
    if task == "steps":
        rows = [["records", m["n_records"]]] + _step_rows(m)
        rows += [[f"solution AUROC ({how})", _fmt(v)] for how, v in m["solution_auroc"].items()]
        print(_table(["metric", "value"], rows))
    elif task == "processbench":
        rows = [[name, _fmt(r["acc_erroneous"], True), _fmt(r["acc_correct"], True), _fmt(r["f1"], True),
                 r["n_erroneous"], r["n_correct"]] for name, r in m["splits"].items()]
        rows.append(["average", "", "", _fmt(m["average_f1"], True), "", ""])
        print(_table(["split", "acc_err %", "acc_ok %", "F1 %", "n_err", "n_ok"], rows))
        print(_table(["step metric", "value"], _step_rows(m["steps"])))
    else:
        rows = [[f"best-of-N ({how})", _fmt(v)] for how, v in m["selection"].items()]
        rows += [["majority vote", _fmt(m["majority"])], ["random", _fmt(m["random"])],
                 ["pass@N", _fmt(m["pass_at_n"])], ["groups", m["n_groups"]],
                 ["mean N", f"{m['mean_n']:.2f}"]]
        print(_table(["selection", "accuracy"], rows))


def write_plots(task, data, metrics, out_dir: Path, threshold: float) -> list[str]:
    """PNG plots: reliability diagram and step-score histograms, or the best-of-N bar chart."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    written = []

    def save(fig, name):  # rendered in memory, so a failed write leaves no half PNG
        path, png = out_dir / name, io.BytesIO()
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
        write_output("--plot", path, png.getvalue())
        written.append(str(path))

    if task == "bon":
        names = list(metrics["selection"]) + ["random", "pass@N"]
        vals = list(metrics["selection"].values()) + [metrics["random"], metrics["pass_at_n"]]
        if metrics["majority"] is not None:
            names.insert(-2, "majority")
            vals.insert(-2, metrics["majority"])
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        n_agg = len(metrics["selection"])
        bars = ax.bar(names, vals, color=["C0"] * n_agg + ["C1"] * (len(names) - n_agg))
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"best-of-N over {metrics['n_groups']} groups (mean N {metrics['mean_n']:.1f})")
        ax.tick_params(axis="x", rotation=30)
        save(fig, "bon.png")
        return written

    pairs = data["pairs"]
    if not pairs:
        print("no labelled steps: no reliability diagram or histogram")
        return written
    cal = (metrics if task == "steps" else metrics["steps"])["calibration"]
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    full = [b for b in cal["bins"] if b["count"]]
    width = 1.0 / cal["n_bins"]
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           edgecolor="k", alpha=0.7, label="fraction correct")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.plot([b["mean_prob"] for b in full], [b["accuracy"] for b in full], "o-", color="C3",
            label="bin mean score")
    ax.set_xlabel("step score")
    ax.set_ylabel("fraction of steps labelled correct")
    ax.set_title(f"reliability (ECE {_fmt(cal['ece'])}, {len(pairs)} steps)")
    ax.legend(loc="upper left")
    save(fig, "reliability.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ok = [p for p, y in pairs if y >= 0.5]
    bad = [p for p, y in pairs if y < 0.5]
    ax.hist([ok, bad], bins=20, range=(0, 1), color=["C2", "C3"], alpha=0.8,
            label=[f"correct steps ({len(ok)})", f"wrong steps ({len(bad)})"])
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("step score")
    ax.set_ylabel("steps")
    ax.legend()
    save(fig, "step_scores.png")
    return written


def _no_nan(x):
    """nan is not JSON; write it as null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x
