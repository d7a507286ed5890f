"""Readers that turn the PRM data formats found in the wild into Records.

Every reader reports every bad record as "FILE:LINE: field: message" and keeps going, so
one run shows all that is wrong with a file. Files are JSONL (one object a line) or one
JSON array (ProcessBench); which one is sniffed from the first character, for any format.
What stops a whole file (not a regular file, compressed, UTF-16, empty) is named once, and
what Python's json lets through or raises on (duplicate keys, lone surrogates, nesting too
deep, integers past the digit limit) is a FILE:LINE problem like any other.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreamprm.config import DEFAULT_STEP_TAG, READER_FORMATS
from dreamprm.data.record import Record, record_from_json, record_problems, surrogate_problem
from dreamprm.errors import DataError

log = logging.getLogger(__name__)

MAX_LEAN_STEPS = 64  # longer proofs have their tail merged into the last step


@dataclass
class _Row:
    """Where a raw row came from: its default id is FILE:LINE, as the problems name it."""
    path: Path
    line: int  # 1-based line where the row (or array element) starts
    index: int  # 0-based position of the row in the file

    @property
    def default_id(self) -> str:
        return f"{self.path.name}:{self.line}"


class _Bad(Exception):
    """A row that cannot become a record; args[0] is a list of 'field: message'."""


# ---------------------------------------------------------------------------- field helpers

_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "true or false",
               int: "an integer", float: "a number"}


def _field(d: dict, key: str, kinds: tuple, errs: list, required: bool = True, where: str = ""):
    """d[key] if it has one of the types `kinds`, else None with 'WHERE.KEY: ...' added to errs.
    An optional field may be absent or null."""
    if d.get(key) is None:
        if required:
            errs.append(f"{where}{key}: missing" if key not in d else f"{where}{key}: is null")
        return None
    v = d[key]
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        name = " or ".join(_TYPE_NAMES[k] for k in kinds if not (k is int and float in kinds))
        errs.append(f"{where}{key}: expected {name}, got {type(v).__name__} {str(v)[:40]!r}")
        return None
    return v


def _prob(x):
    """Booleans and ints as floats; anything else is passed on for record_problems to name."""
    return float(x) if isinstance(x, (bool, int, float)) else x


def _group(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------- formats

def _id(d: dict, row: _Row, errs: list, *keys: str) -> str:
    """The first of keys that is set (a string, or an integer as its string), else the row's
    FILE:LINE; a key holding anything else (a list, an object, true, 1.5) is an error."""
    for key in keys:
        v = _field(d, key, (str, int), errs, required=False)
        if v is not None:
            return str(v)
    return row.default_id


def _dreamprm(d: dict, row: _Row) -> list[Record]:
    try:
        return [record_from_json(d)]
    except KeyError as e:
        raise _Bad([f"{k}: missing" for k in e.args[0].split(", ")]) from None
    except ValueError as e:
        raise _Bad([str(e)]) from None


_STEP_HEADER = re.compile(r"^###\s*Step\s+(\d+)\b[ \t]*:?[ \t]*", re.MULTILINE)


def _minif2f(d: dict, row: _Row) -> list[Record]:
    """MiniF2F CoT rows of the seed script: '### Step k' headers split cot_response into steps
    (the title after the header is part of the step), cot_steps[k].pi is the soft label of
    step k, meta_label the outcome; the question is informal_prefix + "\\n" + formal_statement."""
    errs = []
    text = _field(d, "cot_response", (str,), errs)
    cot = _field(d, "cot_steps", (list,), errs)
    prefix = _field(d, "informal_prefix", (str,), errs, required=False) or ""
    statement = _field(d, "formal_statement", (str,), errs, required=False) or ""
    if "informal_prefix" not in d and "formal_statement" not in d:
        errs.append("formal_statement: missing (with informal_prefix it forms the question)")
    outcome = _field(d, "meta_label", (int, float, bool), errs, required=False)
    rid = _id(d, row, errs, "id", "name")
    steps = []
    if text is not None:
        heads = list(_STEP_HEADER.finditer(text))
        if not heads:
            errs.append("cot_response: no '### Step k' headers found")
        else:
            if text[:heads[0].start()].strip():
                errs.append("cot_response: text before ### Step 1")
            numbers = [int(h.group(1)[:12]) for h in heads]  # past 12 digits it is wrong anyway
            if numbers != list(range(1, len(heads) + 1)):
                errs.append(f"cot_response: step headers numbered {numbers[:10]}, expected 1..{len(heads)}")
            ends = [h.start() for h in heads[1:]] + [len(text)]
            steps = [text[h.end():e].strip() for h, e in zip(heads, ends)]
    labels = []
    if cot is not None:
        for k, s in enumerate(cot):
            pi = s.get("pi") if isinstance(s, dict) else None
            if isinstance(pi, bool) or not isinstance(pi, (int, float)) or not 0 <= pi <= 1:
                errs.append(f"cot_steps[{k}].pi: expected a number in [0, 1], got {str(s)[:40]!r}")
            labels.append(_prob(pi))
        if steps and len(cot) != len(steps):
            errs.append(f"cot_steps: {len(cot)} entries for {len(steps)} steps in cot_response")
    if errs:
        raise _Bad(errs)
    question = "\n".join(p for p in (prefix.rstrip("\n"), statement) if p)
    return [Record(id=rid, question=question,
                   steps=steps, labels=labels, outcome=_prob(outcome), domain=d.get("domain"))]


def _trl(d: dict, row: _Row) -> list[Record]:
    """TRL stepwise supervision: prompt, completions (one string per step), labels."""
    errs = []
    prompt = _field(d, "prompt", (str,), errs)
    steps = _field(d, "completions", (list,), errs)
    labels = _field(d, "labels", (list,), errs)
    rid = _id(d, row, errs, "id")
    if errs:
        raise _Bad(errs)
    return [Record(id=rid, question=prompt, steps=steps,
                   labels=[_prob(y) for y in labels], domain=d.get("domain"))]


def _math_shepherd(d: dict, row: _Row) -> list[Record]:
    """Math-Shepherd: "input" ends every step with the tag "ки"; "label" is the same text with
    "+" or "-" in place of each tag. The question is the text before "Step 1:"; steps keep
    their "Step k:" prefix as written."""
    errs = []
    text = _field(d, "input", (str,), errs)
    marked = _field(d, "label", (str,), errs)
    rid = _id(d, row, errs, "id")
    if errs:
        raise _Bad(errs)
    segs = text.split("ки")
    if len(segs) < 2:
        raise _Bad(["input: no 'ки' step tags"])
    if segs[-1].strip():
        errs.append(f"input: text after the last 'ки' tag: {segs[-1].strip()[:40]!r}")
    start = segs[0].find("Step 1:")
    if start < 0:
        errs.append("input: no 'Step 1:' marker (the question is the text before it)")
    labels, pos = [], 0
    for k, seg in enumerate(segs[:-1]):
        mark = marked[pos + len(seg):pos + len(seg) + 1]
        if not marked.startswith(seg, pos) or mark not in ("+", "-"):
            errs.append(f"label: does not match input at step {k + 1} (expected the input text "
                        "with '+' or '-' in place of each 'ки')")
            break
        labels.append(1.0 if mark == "+" else 0.0)
        pos += len(seg) + 1
    if errs:
        raise _Bad(errs)
    steps = [segs[0][start:].strip()] + [s.strip() for s in segs[1:-1]]
    return [Record(id=rid, question=segs[0][:start].strip(),
                   steps=steps, labels=labels, domain=d.get("task", d.get("domain")))]


def _processbench(d: dict, row: _Row) -> list[Record]:
    """ProcessBench: label is the 0-based index of the first wrong step (-1: all correct).
    Steps before it get 1.0, the wrong step 0.0, later steps None (not judged). meta keeps
    first_error (for the ProcessBench metric), generator and group (problem hash, for
    best-of-N); the domain is the split named by the file stem unless a domain is given."""
    errs = []
    rid = _field(d, "id", (str, int), errs)
    problem = _field(d, "problem", (str,), errs)
    steps = _field(d, "steps", (list,), errs)
    first = _field(d, "label", (int,), errs)
    correct = _field(d, "final_answer_correct", (bool,), errs)
    if steps is not None and first is not None and not -1 <= first < len(steps):
        errs.append(f"label: {first} is not a step index for {len(steps)} steps (use -1 for all correct)")
    if errs:
        raise _Bad(errs)
    n = len(steps) if first == -1 else first
    labels = [1.0] * n + ([0.0] + [None] * (len(steps) - n - 1) if first != -1 else [])
    meta = {"first_error": first, "generator": d.get("generator"), "group": _group(problem)}
    return [Record(id=str(rid), question=problem, steps=steps, labels=labels, outcome=float(correct),
                   domain=d.get("domain") or row.path.stem, meta=meta)]


def _mr_gsm8k(d: dict, row: _Row) -> list[Record]:
    """MR-GSM8K graded solutions: model_output_steps (kept as written, "Step k:" prefix
    included), model_output_solution_first_error_step (1-based) for a solution graded
    "wrong". Labels as ProcessBench: steps before the first error 1.0, that step 0.0, later
    steps None; a solution graded "correct" is all 1.0. outcome = model_output_answer_correctness
    (the final answer, which can be right in a wrong solution); question = question; domain =
    question_type (original, reversed, POT); meta keeps first_error (0-based, -1: none) and group."""
    errs = []
    question = _field(d, "question", (str,), errs)
    steps = _field(d, "model_output_steps", (list,), errs)
    graded = _field(d, "model_output_solution_correctness", (str,), errs)
    answer = _field(d, "model_output_answer_correctness", (str,), errs, required=False)
    rid = _id(d, row, errs, "uuid")
    for key, v in (("model_output_solution_correctness", graded), ("model_output_answer_correctness", answer)):
        if v is not None and v not in ("correct", "wrong"):
            errs.append(f"{key}: expected 'correct' or 'wrong', got {v[:40]!r}")
    first = None
    if graded == "wrong":
        first = _field(d, "model_output_solution_first_error_step", (int,), errs)
        if steps is not None and first is not None and not 1 <= first <= len(steps):
            errs.append(f"model_output_solution_first_error_step: {first} is not a step number "
                        f"for {len(steps)} steps (1-based)")
    if errs:
        raise _Bad(errs)
    n = len(steps) if first is None else first - 1
    labels = [1.0] * n + ([0.0] + [None] * (len(steps) - n - 1) if first is not None else [])
    meta = {"first_error": -1 if first is None else first - 1, "group": _group(question)}
    return [Record(id=rid, question=question, steps=steps,
                   labels=labels, outcome=None if answer is None else float(answer == "correct"),
                   domain=d.get("domain") or d.get("question_type") or row.path.stem, meta=meta)]


def _prmbench(d: dict, row: _Row) -> list[Record]:
    """PRMBench: modified_process (the steps under test), error_steps (1-based numbers of the
    wrong steps; empty: all correct). Every step is labelled: 0.0 in error_steps, else 1.0.
    question = modified_question (what the modified process answers); domain = classification
    (the error type); id = classification/idx (idx repeats across error types); group = idx;
    outcome None (the benchmark grades steps only)."""
    errs = []
    question = _field(d, "modified_question", (str,), errs)
    steps = _field(d, "modified_process", (list,), errs)
    wrong = _field(d, "error_steps", (list,), errs)
    kind = _field(d, "classification", (str,), errs, required=False)
    idx = _field(d, "idx", (str, int), errs)
    if steps is not None and wrong is not None:
        bad = [k for k in wrong if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(steps)]
        if bad:
            errs.append(f"error_steps: {bad[:5]} are not step numbers 1..{len(steps)}")
    if errs:
        raise _Bad(errs)
    labels = [0.0 if k + 1 in wrong else 1.0 for k in range(len(steps))]
    return [Record(id=f"{kind}/{idx}" if kind else str(idx), question=question, steps=steps,
                   labels=labels, domain=d.get("domain") or kind,
                   meta={"error_steps": wrong, "group": str(idx)})]


_PRM800K_RATING = {1: 1.0, 0: 1.0, -1: 0.0, None: None}


def _prm800k(d: dict, row: _Row) -> list[Record]:
    """Raw PRM800K (phase 1/2) rows. Each step follows the chosen completion, or the human
    completion when none was chosen. Ratings map +1 and 0 (neutral: not wrong) to 1.0 and -1
    to 0.0; an unrated completion is unlabelled, a human completion counts as correct unless
    rated. The solution ends at the first step with neither a chosen nor a human completion;
    that step is kept only if a completion there was rated -1 (the first one, labelled 0.0),
    which is how a found_error trajectory ends. outcome stays None: the final answer is not
    graded here (meta keeps ground_truth_answer and finish_reason)."""
    errs = []
    question = _field(d, "question", (dict,), errs)
    label = _field(d, "label", (dict,), errs)
    rid = _id(d, row, errs, "id")
    if errs:
        raise _Bad(errs)
    problem = _field(question, "problem", (str,), errs, where="question.")
    raw_steps = _field(label, "steps", (list,), errs, where="label.")
    if errs:
        raise _Bad(errs)
    steps, labels = [], []
    for k, s in enumerate(raw_steps):
        comps = (s.get("completions") or []) if isinstance(s, dict) else None
        if comps is None or not all(isinstance(c, dict) for c in comps):
            raise _Bad([f"label.steps[{k}]: expected an object with a completions list"])
        chosen, human = s.get("chosen_completion"), s.get("human_completion")
        if chosen is not None:
            if type(chosen) is not int or not 0 <= chosen < len(comps):
                raise _Bad([f"label.steps[{k}].chosen_completion: {chosen!r} is not an index into "
                            + f"{len(comps)} completions"])
            pick, default = comps[chosen], None
        elif human is not None:
            pick, default = (human if isinstance(human, dict) else {"text": human}), 1.0
        else:
            bad = [c for c in comps if c.get("rating") == -1]
            if bad:
                steps.append(bad[0].get("text"))
                labels.append(0.0)
            break
        rating = pick.get("rating")
        if not (rating is None or type(rating) is int) or rating not in _PRM800K_RATING:
            raise _Bad([f"label.steps[{k}]: rating {rating!r} is not -1, 0, 1 or null"])
        steps.append(pick.get("text"))
        labels.append(_PRM800K_RATING[rating] if rating is not None else default)
    if not steps:
        raise _Bad(["label.steps: no step with a chosen or human completion"])
    meta = {"finish_reason": label.get("finish_reason"),
            "ground_truth_answer": question.get("ground_truth_answer"), "group": _group(problem)}
    return [Record(id=rid, question=problem, steps=steps,
                   labels=labels, domain=d.get("domain"), meta=meta)]


_LEAN_CONTINUATION = ("<;>", ")", "]", "}", "|")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def lean_steps(completion: str, max_steps: int = MAX_LEAN_STEPS) -> list[str]:
    """Split a prover's Lean completion (the text after the prompt's ':= by') into tactic steps.

    The proof is the text before the first "```", "</think>" or "</s>" (what follows is prose
    or a restated theorem). Its first line follows the prompt, so its indentation is lost;
    the top level is the smallest indentation of the later code lines, at most 2. A later
    code line at column 0 ends the proof (Lean would end the tactic block there; in the data
    it is a new theorem or prose). A step is a top-level line plus its deeper-indented lines
    and lines starting with <;> or a closing bracket; comments (-- and /- -/) go with the step
    after them, trailing ones with the last step. Blank lines are dropped; steps past
    max_steps are merged into the last one.
    """
    body = completion
    for stop in ("```", "</think>", "</s>"):
        body = body.split(stop, 1)[0]
    lines = body.split("\n")
    units, i = [], 0  # (indentation or None for the first line, is_comment, lines)
    while i < len(lines):
        s, ind = lines[i].strip(), (_indent(lines[i]) if i else None)
        j = i
        if s.startswith("/-"):
            while "-/" not in (s[2:] if j == i else lines[j]) and j + 1 < len(lines):
                j += 1
        if s:
            units.append((ind, s.startswith(("--", "/-")), lines[i:j + 1]))
        i = j + 1
    for k, (ind, com, _) in enumerate(units):
        if ind == 0 and not com:
            units = units[:k]
            break
    base = min([ind for ind, com, _ in units if ind is not None and not com] + [2])
    steps, pending = [], []
    for ind, com, ls in units:
        text = [ln[min(base, _indent(ln)):].rstrip() for ln in ls if ln.strip()]
        if steps and ((ind or base) > base or ls[0].lstrip().startswith(_LEAN_CONTINUATION)):
            steps[-1] += pending + text
            pending = []
        elif com:
            pending += text
        else:
            steps.append(pending + text)
            pending = []
    if steps:
        steps[-1] += pending
    if len(steps) > max_steps:
        steps[max_steps - 1:] = [[ln for s in steps[max_steps - 1:] for ln in s]]
    return ["\n".join(s) for s in steps]


def _minif2f_attempts(d: dict, row: _Row) -> list[Record]:
    """Prover attempts with pass/fail only (meta data for the outer loop): outcome = passed,
    every step unlabelled, domain = the prover, group = the theorem name (for best-of-N).
    The question is informal_prefix + "\n" + formal_statement when the row has them (as the
    prover's prompt had), else the theorem name alone. Steps: lean_steps();
    a completion cut by the token limit inside a character ends in U+FFFD, which is dropped.
    An attempt with no tactic at all (only prose or comments) is still a real failed attempt:
    it becomes one step holding its text, marked meta["no_tactics"]; an empty one is an error."""
    errs = []
    name = _field(d, "name", (str,), errs)
    model = _field(d, "model", (str,), errs)
    attempt = _field(d, "attempt", (int,), errs)
    passed = _field(d, "passed", (bool,), errs)
    completion = _field(d, "completion", (str,), errs)
    prefix = _field(d, "informal_prefix", (str,), errs, required=False) or ""
    statement = _field(d, "formal_statement", (str,), errs, required=False) or ""
    text = completion.rstrip("\ufffd") if completion is not None else None
    steps = lean_steps(text) if text is not None else []
    meta = {"group": name, "problem_idx": d.get("problem_idx")}
    if text is not None and not steps:
        if text.strip():
            steps, meta["no_tactics"] = [text.strip()], True
        else:
            errs.append("completion: empty")
    if errs:
        raise _Bad(errs)
    question = "\n".join(p for p in (prefix.rstrip("\n"), statement.rstrip("\n")) if p) or name
    return [Record(id=f"{name}/{model}/{attempt}", question=question, steps=steps,
                   labels=[None] * len(steps), outcome=float(passed), domain=model, meta=meta)]


_FINAL_ANSWER = re.compile(r"^(?:####|A:)\s*(.+?)\s*$")


def _gsm8k_candidates(d: dict, row: _Row) -> list[Record]:
    """OpenAI GSM8K model solutions: one record per candidate {is_correct, solution} of a row.
    Steps are the solution's non-empty lines (the last, "A: 18" or "#### 18", included);
    meta keeps group (the row index, for best-of-N) and the parsed final answer."""
    errs = []
    question = _field(d, "question", (str,), errs)
    keys = [k for k, v in d.items() if isinstance(v, dict) and "solution" in v]
    if not keys:
        errs.append("solution: no candidate objects with 'solution' and 'is_correct'")
    out = []
    for key in keys:
        sol = _field(d[key], "solution", (str,), errs, where=f"{key}.")
        ok = _field(d[key], "is_correct", (bool,), errs, where=f"{key}.")
        if sol is None or ok is None:
            continue
        steps = [s.strip() for s in sol.split("\n") if s.strip()]
        m = _FINAL_ANSWER.match(steps[-1]) if steps else None
        out.append(Record(id=f"{row.index}/{key}", question=question, steps=steps,
                          labels=[None] * len(steps), outcome=float(ok), domain=key,
                          meta={"group": row.index, "answer": m.group(1) if m else None}))
    if errs:
        raise _Bad(errs)
    return out


# The names' one home is config.READER_FORMATS (the config validates --train_format with them); the reader
# of format F is _F above.
FORMATS = {name: globals()[f"_{name}"] for name in READER_FORMATS}


def _guess(d: dict) -> list[str]:
    """Formats whose signature keys the first record has."""
    keys = set(d)
    found = []
    if "schema" in keys or {"id", "question", "steps"} <= keys:
        found.append("dreamprm")
    if "cot_response" in keys:
        found.append("minif2f")
    if {"prompt", "completions", "labels"} <= keys:
        found.append("trl")
    if {"input", "label"} <= keys and isinstance(d["label"], str):
        found.append("math_shepherd")
    if {"problem", "steps", "label"} <= keys:
        found.append("processbench")
    if isinstance(d.get("question"), dict) and isinstance(d.get("label"), dict):
        found.append("prm800k")
    if {"completion", "passed"} <= keys:
        found.append("minif2f_attempts")
    if "question" in keys and any(isinstance(v, dict) and {"solution", "is_correct"} <= set(v)
                                  for v in d.values()):
        found.append("gsm8k_candidates")
    if "model_output_steps" in keys:
        found.append("mr_gsm8k")
    if {"modified_process", "error_steps"} <= keys:
        found.append("prmbench")
    return found


# ---------------------------------------------------------------------------- files

_SPACE = re.compile(r"\s*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # cheap test before looking for lone surrogates

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))

# Leading bytes of files that are not UTF-8 text: (bytes, what the file is, how to make it readable).
_NOT_TEXT = ((b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip -k FILE)"),
             (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz -k FILE)"),
             (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd FILE)"),
             (b"BZh", "bzip2-compressed", "decompress it first (bunzip2 -k FILE)"),
             (b"PK\x03\x04", "a zip archive", "unzip it and pass the data file inside"),
             (b"PAR1", "a Parquet file", "write it out as JSONL first (pandas: read_parquet(FILE).to_json(OUT, "
                                         "orient='records', lines=True))"),
             (codecs.BOM_UTF32_LE, "UTF-32 text (byte-order mark)", "re-encode it as UTF-8 (iconv -f UTF-32 -t UTF-8)"),
             (codecs.BOM_UTF32_BE, "UTF-32 text (byte-order mark)", "re-encode it as UTF-8 (iconv -f UTF-32 -t UTF-8)"),
             (codecs.BOM_UTF16_LE, "UTF-16 text (byte-order mark)", "re-encode it as UTF-8 (iconv -f UTF-16 -t UTF-8)"),
             (codecs.BOM_UTF16_BE, "UTF-16 text (byte-order mark)", "re-encode it as UTF-8 (iconv -f UTF-16 -t UTF-8)"))


def file_problem(path) -> str | None:
    """Why path cannot be a data file (missing, a directory, a FIFO, a symlink loop, ...), or None
    for a regular file. Only stat is used: opening a FIFO would block until a writer comes."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path}: is a symbolic link loop (it leads back to itself); point it at a data file"
        if e.errno == errno.ENOENT and path.is_symlink():
            return f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno == errno.ENOENT:
            return f"{path}: no such file"
        return f"{path}: cannot read: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    if stat.S_ISDIR(mode):
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".jsonl", ".json"))
        except OSError:
            inside = []
        hint = f" (it holds {', '.join(inside[:3])}{' ...' if len(inside) > 3 else ''})" if inside else ""
        return f"{path}: is a directory, not a data file; pass one JSONL or JSON file{hint}"
    return f"{path}: is {kind}, not a data file; write the data to a regular JSONL or JSON file and pass that"


def _not_text(path: Path, data: bytes) -> str | None:
    """The one message for a file that is not UTF-8 JSON text at all (compressed, another encoding)."""
    for magic, what, fix in _NOT_TEXT:
        if data.startswith(magic):
            return f"{path}: is {what}, not UTF-8 JSON text; {fix}"
    nul = data.find(b"\x00", 0, 4096)
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        return (f"{path}:{line}: holds NUL bytes: UTF-16 text without a byte-order mark, "
                "or not a text file; re-encode it as UTF-8")
    return None


def _no_records(path: Path, data: bytes) -> str | None:
    """The one message for a data file with nothing but blank lines."""
    body = data.removeprefix(codecs.BOM_UTF8)
    if not body:
        return f"{path}: is empty (no records); pass a file with one JSON record per line"
    if not body.strip():
        n = body.count(b"\n") + (not body.endswith(b"\n"))
        return (f"{path}: is empty: its {n} line(s) are blank (no records); pass a file "
                "with one JSON record per line")
    return None


def file_bytes(path) -> tuple[bytes | None, str | None]:
    """A whole file the user passed, as (bytes, None), or (None, 'FILE: why it is no JSON text'): not a regular
    file (file_problem; a FIFO is never opened), unreadable, compressed or in another encoding."""
    path = Path(path)
    bad = file_problem(path)
    if bad is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            return None, f"{path}: cannot read: {e.strerror or e}"
        bad = _not_text(path, data)
    return (None, bad) if bad else (data, None)


def read_json(path) -> tuple[object, str | None]:
    """A file that holds one JSON value (a DeepSpeed config), as (value, None) or (None, 'FILE[:LINE]: what is
    wrong'): the file's kind (file_bytes), UTF-8, and everything parse_json refuses."""
    data, bad = file_bytes(path)
    if bad:
        return None, bad
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return None, f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file as UTF-8"
    if not text.strip():
        return None, f"{path}: is empty; it must hold one JSON value"
    return parse_json(text, str(path))


def _json_problem(e: Exception) -> str:
    """What a json error means for the user who wrote the file."""
    if isinstance(e, RecursionError):
        return "JSON nested too deeply (Python's parser stops near 1000 levels); flatten the record"
    if isinstance(e, json.JSONDecodeError):  # a whole file (read_json) has lines, a JSONL line has one
        return f"invalid JSON ({e.msg} at {f'line {e.lineno}, ' if e.lineno > 1 else ''}column {e.colno})"
    if "integer string conversion" in str(e):
        return (f"an integer has more than {sys.get_int_max_str_digits()} digits (Python's limit for reading "
                "integers); write it as a string or a float")
    return f"invalid JSON ({e})"


def _decoder(dups: list) -> json.JSONDecoder:
    """A decoder that appends every duplicate key of an object to dups (plain json keeps the
    last value silently)."""
    def obj(pairs):
        d = dict(pairs)
        if len(d) < len(pairs):
            seen: set = set()
            dups.extend(k for k, _ in pairs if k in seen or seen.add(k))
        return d
    return json.JSONDecoder(object_pairs_hook=obj)


def _lone_surrogate(value) -> str | None:
    """'FIELD: ...' for the first string (or key) holding a lone surrogate, walking without recursion."""
    todo = [("", value)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, str):
            if bad := surrogate_problem(v):
                return f"{where or 'line'}: {bad}"
        elif isinstance(v, dict):
            for k, x in reversed(v.items()):
                if bad := surrogate_problem(k):
                    return f"{where or 'line'}: key {ascii(k)}: {bad}"
                todo.append((f"{where}.{k}" if where else k, x))
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


def _checked(obj, text: str, dups: list, where: str) -> str | None:
    """'WHERE: what' for a decoded value that must not be used: a duplicate key, a lone surrogate."""
    if dups:
        return (f"{where}: duplicate key {dups[0]!r} in one JSON object (a JSON reader keeps only the last "
                "value); keep one")
    if _SURROGATE_ESCAPE.search(text) and (bad := _lone_surrogate(obj)):
        if where == "line":
            return bad
        return f"{where}.{bad}" if where.startswith("[") else f"{where}: {bad}"  # [3].question; FILE: x (read_json)
    return None


def parse_json(text: str, where: str = "line") -> tuple[object, str | None]:
    """One JSON value of a file the user wrote, as (value, None) or (None, 'WHERE: what is wrong'):
    invalid JSON, nesting too deep, an integer past Python's digit limit, a duplicate key, a lone
    surrogate. The field of a lone surrogate replaces WHERE when it is inside an object."""
    dups: list = []
    try:
        obj = _decoder(dups).decode(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and the int digit limit are ValueErrors
        return None, f"{where}: {_json_problem(e)}"
    bad = _checked(obj, text, dups, where)
    return (None, bad) if bad else (obj, None)


def _one_object(path: Path, text: str, first: str) -> str | None:
    """The message for a file that is one JSON object over several lines (pretty-printed),
    which the JSONL reader would report as one bad line per line; None for anything else."""
    try:
        json.loads(first)
        return None  # the first line is a whole object: JSONL
    except json.JSONDecodeError:
        pass
    except (ValueError, RecursionError):
        return None  # a bad line of its own: the JSONL reader names it
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    hint = (f"; its {lists[0]!r} list of {len(obj[lists[0]])} objects may be the records: write it out "
            "as a JSON array or one object per line" if lists else "")
    return (f"{path}: is one JSON object spread over several lines (keys {sorted(obj)[:8]}); expected "
            f"JSONL (one record object per line) or a JSON array of records{hint}")


def _rows(path: Path, problems: list) -> tuple[list, bool]:
    """([(row, obj)], fatal): objects of a JSONL file or a JSON array, with their lines.
    Row-level problems (bad JSON on a line) are skippable; fatal ones lose the rest of the file."""
    data, bad = file_bytes(path)
    bad = bad or _no_records(path, data)
    if bad:
        problems.append(bad)
        return [], True
    lines = data.split(b"\n")
    texts = []
    for n, raw in enumerate(lines, 1):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{n}: line: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); re-encode the file as UTF-8")
            texts.append(None)
    if texts and texts[0] is not None:
        texts[0] = texts[0].lstrip("\ufeff")
    first = next((t.lstrip() for t in texts if t and t.strip()), "")
    if first.startswith("{") and None not in texts:
        whole = _one_object(path, "\n".join(texts), first)
        if whole:
            problems.append(whole)
            return [], True
    if not first.startswith("["):  # JSONL: every line stands alone
        out = []
        for n, t in enumerate(texts, 1):
            if t is not None and not t.strip():
                continue
            obj = None
            if t is not None:
                obj, why = parse_json(t)
                if why is None and not isinstance(obj, dict):
                    why = f"line: expected a JSON object, got {type(obj).__name__}"
                if why:
                    problems.append(f"{path}:{n}: {why}")
                    obj = None
            out.append((_Row(path, n, len(out)), obj))  # unreadable rows keep their index
        return out, False
    if any(t is None for t in texts):
        return [], True
    text = "\n".join(texts)
    dups: list = []
    dec, out = _decoder(dups), []
    pos, line = text.index("[") + 1, 1
    while True:
        start = _SPACE.match(text, pos).end()
        if text.startswith("]", start) and not out:
            return out, False
        line += text.count("\n", pos, start)
        dups.clear()
        try:
            obj, end = dec.raw_decode(text, start)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{e.lineno}: line: invalid JSON ({e.msg} at column {e.colno}); "
                            "the rest of the array was not read")
            return out, True
        except (ValueError, RecursionError) as e:
            problems.append(f"{path}:{line}: [{len(out)}]: {_json_problem(e)}; the rest of the array was not read")
            return out, True
        where = f"[{len(out)}]"
        why = (f"{where}: expected a JSON object, got {type(obj).__name__}" if not isinstance(obj, dict)
               else _checked(obj, text[start:end], dups, where))
        if why:
            problems.append(f"{path}:{line}: {why}")
            obj = None
        out.append((_Row(path, line, len(out)), obj))
        pos = _SPACE.match(text, end).end()
        line += text.count("\n", start, pos)
        if text.startswith("]", pos):
            return out, False
        if not text.startswith(",", pos):
            problems.append(f"{path}:{line}: line: expected ',' or ']' after array element {len(out) - 1}")
            return out, True
        pos += 1


def detect_format(path, rows: list | None = None, format_flag: str = "--from") -> str:
    """The format named by the keys of the file's first record; DataError if none or several, saying to pass
    format_flag (the flag that names the format where the file was given: --from, --train_format, ...)."""
    path = Path(path)
    if rows is None:
        rows, _ = _rows(path, [])
    first = next((obj for _, obj in rows if obj is not None), None)
    if first is None:
        raise DataError([f"{path}: cannot tell the format: no readable JSON object; pass {format_flag}"])
    found = _guess(first)
    if len(found) != 1:
        what = "matches " + ", ".join(found) if found else "matches no known format"
        raise DataError([f"{path}: cannot tell the format: the first record (keys {sorted(first)[:12]}) "
                         + f"{what}; pass {format_flag} one of {', '.join(FORMATS)}"])
    return found[0]


def _read(path, fmt: str, step_tag: str, format_flag: str = "--from") -> tuple[list[Record], list[str], bool]:
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    path, problems = Path(path), []
    rows, fatal = _rows(path, problems)
    if fatal and not rows:  # nothing was read: a format guess would only add noise
        return [], problems, True
    if not rows and not problems:
        return [], [f"{path}: is an empty JSON array (no records)"], True
    if all(obj is None for _, obj in rows):  # each row named its problem: a format guess would only add noise
        return [], problems, True
    if fmt == "auto":
        try:
            fmt = detect_format(path, rows, format_flag)
        except DataError as e:
            return [], problems + e.problems, True
    records, seen = [], {}
    for row, obj in rows:
        if obj is None:  # already reported by _rows
            continue
        where = f"{path}:{row.line}"
        try:
            recs = FORMATS[fmt](obj, row)
        except _Bad as e:
            problems += [f"{where}: {m}" for m in e.args[0]]
            continue
        for rec in recs:
            own = f" (record {rec.id})" if len(recs) > 1 else ""
            bad = record_problems(rec, step_tag)
            if rec.id in seen:
                bad.append(f"id: duplicate id {rec.id!r} (first at line {seen[rec.id]})")
            else:
                seen[rec.id] = row.line
            problems += [f"{where}: {m}{own}" for m in bad]
            if not bad:
                records.append(rec)
    return records, problems, fatal


def load_records(path, fmt: str = "auto", step_tag: str = DEFAULT_STEP_TAG,
                 skip_invalid: bool = False, format_flag: str = "--from") -> list[Record]:
    """The records of a file, or DataError listing every problem. With skip_invalid, invalid
    records are left out and named in a warning; problems that stop the file from being read
    to its end (missing file, unknown format, broken JSON array) and a file with no valid
    record still raise. format_flag: the flag a message tells to pass when the format cannot be guessed."""
    records, problems, fatal = _read(path, fmt, step_tag, format_flag)
    if problems and (fatal or not skip_invalid or not records):
        raise DataError(problems, skippable=not fatal and bool(records))
    if problems:
        lines = list(dict.fromkeys(p.split(": ", 1)[0].rsplit(":", 1)[1] for p in problems))
        log.warning("skipped %d invalid records in %s: lines %s", len(lines), path, ", ".join(lines))
    return records


# ---------------------------------------------------------------------------- summary

def summary(records: list[Record], tokenizer=None) -> dict:
    """Counts for `dreamprm data check`. Token lengths (with a tokenizer) count the question,
    each step and one token per step tag, as the piecewise encoding builds them (no chat
    template), so they are a close lower bound of the training length; percentiles are
    observed lengths (numpy's "higher" method), handy for choosing max_length."""
    n_steps = [len(r.steps) for r in records]
    labels = [y for r in records for y in r.labels]
    known = [y for y in labels if y is not None]
    outcomes = [r.outcome for r in records]
    domains: dict = {}
    for r in records:
        domains[r.domain or "(none)"] = domains.get(r.domain or "(none)", 0) + 1
    out = {
        "records": len(records),
        "steps": {"total": sum(n_steps), "mean": round(float(np.mean(n_steps)), 2) if records else 0.0,
                  "max": max(n_steps, default=0)},
        "labels": {"correct (>=0.5)": sum(y >= 0.5 for y in known), "wrong (<0.5)": sum(y < 0.5 for y in known),
                   "unlabelled": len(labels) - len(known), "soft (0<y<1)": sum(0 < y < 1 for y in known)},
        "outcomes": {"correct (>=0.5)": sum(o is not None and o >= 0.5 for o in outcomes),
                     "wrong (<0.5)": sum(o is not None and o < 0.5 for o in outcomes),
                     "none": sum(o is None for o in outcomes)},
        "domains": dict(sorted(domains.items())),
    }
    if tokenizer is not None and records:
        def n_tok(texts):
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        q = n_tok([r.question for r in records])
        s = iter(n_tok([s for r in records for s in r.steps]))
        lengths = np.array([q[i] + sum(next(s) + 1 for _ in r.steps) for i, r in enumerate(records)])
        pct = {p: int(np.percentile(lengths, p, method="higher")) for p in (50, 95)}
        out["tokens"] = {"mean": round(float(lengths.mean()), 1), "p50": pct[50], "p95": pct[95],
                         "max": int(lengths.max())}
    return out


def format_summary(s: dict) -> str:
    """The summary (and data.tokenize.length_report's keys) as aligned text lines."""
    lines = [f"records: {s['records']}",
             f"steps: {s['steps']['total']} (mean {s['steps']['mean']}, max {s['steps']['max']} per record)"]
    for key in ("labels", "outcomes", "domains", "tokens", "buckets"):
        if key in s:
            label = key if "chat_template" not in s or key != "tokens" else \
                f"tokens (as trained, chat template {'on' if s['chat_template'] else 'off'})"
            lines.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in s[key].items()))
    if "cut" in s:
        c = s["cut"]
        lines.append(f"max_length {c['max_length']}: {c['whole']} whole, {c['truncated']} truncated at a step "
                     f"boundary, {c['dropped']} dropped (first step does not fit); {c['steps_cut']} of "
                     f"{c['steps_total']} steps cut")
    return "\n".join(lines)
