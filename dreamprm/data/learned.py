"""A run's learned weights read back: its instance_weights.jsonl, the config.yaml and status.json beside it,
and the checkpoint the weights belong to. `dreamprm weights` (audit.py) and --weights_from (data/sources.py,
preflight.py) read them here.

A row of instance_weights.jsonl: {"id", "index", "domain", "weight", "step", "manifest"}, plus "source" where
a row names one. "step" and "manifest" (checkpoint.manifest_id) say which checkpoint of the run the weights
are from: the trainer writes the file after each checkpoint, so after a resume that fell back to an earlier
checkpoint it holds the weights of the one set aside until the next save. Files without them (older runs,
hand-written ones) read as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from dreamprm import checkpoint as ckpt
from dreamprm.config import CHECKPOINTS_DIR, DEMO_DIR, Source, parse_sources
from dreamprm.errors import CheckpointError, WeightsError

WEIGHTS_FILE = "instance_weights.jsonl"
SHOWN = 20  # problem lines named in one message


def _read_config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise WeightsError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); the trainer writes "
                           "config.yaml whole: restore it, or this is not a run directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot read: {e}") from None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k, {}), dict) for k in ("data", "model", "meta")):
        raise WeightsError(f"{path}: not a run config (no data/model/meta sections); pass the --output_dir of a "
                           "training run")
    return cfg


def _read_status(path: Path) -> dict:
    """status.json, or {} when missing or unreadable (it labels the report and names the run's checkpoint)."""
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def read_weight_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every row of an instance_weights.jsonl, or WeightsError naming FILE:LINE of each
    damaged row. A row: {"id": str, "index": int, "domain": str | null, "weight": number >= 0 | null},
    optionally "source": str, and "step": int >= 0 with "manifest": str, the same in every row."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot read: {e}") from None
    rows, problems, line_of_index, first = [], [], {}, None
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not JSON ({e.msg})")
            continue
        bad = []
        if not isinstance(row, dict):
            problems.append(f"{path}:{n}: not a JSON object")
            continue
        if not isinstance(row.get("id"), str) or not row["id"]:
            bad.append("id: must be a non-empty string")
        index = row.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            bad.append("index: must be an integer >= 0")
        elif index in line_of_index:
            bad.append(f"index: {index} is also at line {line_of_index[index]}")
        else:
            line_of_index[index] = n
        if "domain" not in row or not (row["domain"] is None or isinstance(row["domain"], str)):
            bad.append("domain: must be a string or null")
        w = row.get("weight", "missing")
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                              or w < 0):
            bad.append(f"weight: {w!r} is not a finite number >= 0 (or null)")
        if "source" in row and not isinstance(row["source"], str):
            bad.append("source: must be a string")
        step = row.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            bad.append(f"step: {step!r} is not an integer >= 0")
        if "manifest" in row and not isinstance(row["manifest"], str):
            bad.append("manifest: must be a string")
        mark = (step, row.get("manifest"))
        first = first or (n, mark)
        if mark != first[1]:  # one file, one checkpoint: rows of two were joined
            bad.append(f"step {step!r}, manifest {row.get('manifest')!r}: line {first[0]} has step "
                       f"{first[1][0]!r}, manifest {first[1][1]!r} (rows of two checkpoints)")
        problems += [f"{path}:{n}: {b}" for b in bad]
        if not bad:
            rows.append((n, row))
    if not rows and not problems:
        problems.append(f"{path}: empty (no rows)")
    if problems:
        raise WeightsError(f"{path} is damaged:\n  " + "\n  ".join(problems[:SHOWN])
                           + (f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
                           + "\nthe trainer writes it whole at each checkpoint and at the end: resume the run (the "
                             "same command) to write it again")
    return rows


def written_at(step: int | None) -> str:
    """The checkpoint a weights file is from (Learned.step), in words."""
    if step is None:
        return "its checkpoint not recorded (written by an older dreamprm, or by hand)"
    return f"as of step {step} (checkpoint {ckpt.tag(step)})"


def newest_intact(root: Path, status: dict) -> Path | None:
    """The checkpoint the run continues from: the first of resume's candidates (checkpoint.resume_candidates),
    from the one status.json names on (the run resumed from it or wrote it; those before it were set aside),
    whose manifest reads and whose files have their sizes. Checksums are not read: resume reads them; this
    stays quick on a checkpoint of many GB."""
    cands, _ = ckpt.resume_candidates(root)
    names = [c.name for c in cands]
    named = Path(str(status.get("last_checkpoint") or "")).name
    for c in cands[names.index(named):] if named in names else cands:
        try:
            if not ckpt.file_problems(c, ckpt.read_manifest(c), checksums=False):
                return c
        except CheckpointError:
            continue
    return None


@dataclass
class Learned:
    """The learned weights of a run, read and checked (dreamprm weights, --weights_from)."""
    path: Path  # its instance_weights.jsonl
    cfg: dict | None  # its config.yaml (None: a bare weights file with no config.yaml beside it)
    cfg_path: Path
    status: dict
    rows: list[tuple[int, dict]]  # (line, row) of read_weight_rows

    @property
    def kind(self) -> str:
        """The weight module that learned them (meta.weights; a domain_table's transfer by domain name)."""
        return str((self.cfg or {}).get("meta", {}).get("weights", "?"))

    @property
    def label(self) -> str:
        """What the weights are: a run trained with --weights_from learned none, it used those of another run."""
        given = (self.cfg or {}).get("meta", {}).get("weights_from")
        return f"fixed, transferred from {given}" if given else self.kind

    @property
    def step(self) -> int | None:
        """The update of the checkpoint the weights were written with (None: the file does not say)."""
        return self.rows[0][1].get("step")

    def stale(self) -> str | None:
        """Why these are not the weights of the run's newest intact checkpoint (newest_intact), or None: they
        are, or there is nothing to tell them by (a file that names no step, no checkpoints beside it)."""
        root = self.path.parent / CHECKPOINTS_DIR
        if self.step is None or not root.is_dir():
            return None
        mine, newest = ckpt.tag(self.step), newest_intact(root, self.status)
        if newest is None:
            now = f"{root} holds no intact checkpoint"
        elif newest.name != mine:
            later = ckpt.step_of(newest.name) > self.step
            now = (f"the run's newest intact checkpoint is {newest.name}"
                   + (" (the run stopped before writing its weights)" if later else
                      f" (the run resumed from it, or a resume would: {mine} was set aside)"))
        elif ckpt.manifest_id(newest) != self.rows[0][1].get("manifest"):
            now = f"{newest} was written again since (another history of the run reached that step)"
        else:
            return None
        return (f"{self.path} holds the weights of {mine}, but {now}; the trainer writes the file again at the "
                "run's next checkpoint (resume the run, the same command, if it is not running)")


def stale_problem(flag: str, stale: str) -> str:
    """--weights_from given weights its run has set aside: refused, since they are fixed for the whole run."""
    return (f"{flag}: {stale}; or, to train with these weights as they are, copy the file out of the run "
            "directory and pass its path")


def read_learned(where, flag: str = "RUN_DIR", allow_file: bool = False) -> Learned:
    """A run directory's learned weights (allow_file: or an instance_weights.jsonl given itself); WeightsError
    naming `flag` and what is wrong (not a run directory, a baseline run, no weights yet, damaged weights)."""
    given = Path(where).expanduser()
    if allow_file and given.is_file():
        run, wpath = given.parent, given
    else:
        run, wpath = given, given / WEIGHTS_FILE
    cfg_path = run / "config.yaml"
    if wpath == given:  # a file: its run's config.yaml, when it sits in one
        cfg = _read_config(cfg_path) if cfg_path.is_file() else None
    elif not run.is_dir() or not cfg_path.is_file():
        other = f" or its {WEIGHTS_FILE}" if allow_file else ""
        raise WeightsError(f"{flag} {run}: not a run directory (no config.yaml); pass the --output_dir of a "
                           f"training run{other}")
    else:
        cfg = _read_config(cfg_path)
    status = _read_status(run / "status.json")
    if cfg is not None and cfg.get("meta", {}).get("baseline"):
        raise WeightsError(f"{flag} {run}: a baseline run ({cfg_path}: meta.baseline true): it trained with uniform "
                           "weights and learned none; use a run trained without --baseline")
    if not wpath.is_file():
        state, step = status.get("state", "unknown"), status.get("step", "?")
        every = (cfg or {}).get("run", {}).get("save_every", "?")
        raise WeightsError(f"{wpath}: not written yet (status.json: {state} at step {step}); the trainer writes it "
                           f"at each checkpoint (every --save_every {every} updates) and at the end: run this again "
                           "after the next checkpoint" + (", or resume the run (the same command)"
                                                          if state != "running" else ""))
    return Learned(wpath, cfg, cfg_path, status, read_weight_rows(wpath))


def run_sources_of(learned: Learned) -> list[Source]:
    """The training sources of the run that learned the weights, from its config.yaml ([] without one)."""
    if learned.cfg is None:
        return []
    d = learned.cfg.get("data", {})
    if not d.get("train_file"):
        return [Source("--train_file", str(DEMO_DIR / "train.jsonl"), "train", "minif2f", None)]  # the demo
    sources, problems = parse_sources(d["train_file"], "--train_file", str(d.get("train_format", "auto")))
    if problems:
        raise WeightsError(f"{learned.cfg_path}: data.train_file: " + "; ".join(problems))
    return sources
