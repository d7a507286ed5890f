"""The internal record every reader produces and every consumer reads.

One record is one solution: a question, its reasoning steps, a label per step and an
optional outcome (the meta label). The on-disk form is JSONL with a ``schema`` field so
that a later change of the layout can keep reading old files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from dreamprm.config import DEFAULT_STEP_TAG

SCHEMA_VERSION = 1


@dataclass
class Record:
    id: str
    question: str
    steps: list[str]
    # One entry per step: a probability in [0, 1] that the step is correct (hard 0/1 or a
    # soft Monte-Carlo estimate), or None where the step carries no label (ProcessBench
    # after the first error, or meta data that only has an outcome).
    labels: list[float | None]
    outcome: float | None = None  # solution-level label in [0, 1] (answer right / proof compiled)
    domain: str | None = None
    meta: dict = field(default_factory=dict)  # free-form provenance kept through conversion

    def to_json(self) -> dict:
        d = {"schema": SCHEMA_VERSION, "id": self.id, "question": self.question,
             "steps": self.steps, "labels": self.labels, "outcome": self.outcome,
             "domain": self.domain}
        if self.meta:
            d["meta"] = self.meta
        return d


def _bad_prob(x) -> bool:
    return (isinstance(x, bool) or not isinstance(x, (int, float))
            or math.isnan(x) or not 0.0 <= x <= 1.0)


def record_problems(rec: Record, step_tag: str = DEFAULT_STEP_TAG) -> list[str]:
    """Everything wrong with one record, as 'field: what' strings (empty when valid)."""
    out = []
    if not isinstance(rec.id, str) or not rec.id:
        out.append("id: must be a non-empty string")
    if not isinstance(rec.question, str):
        out.append("question: must be a string")
    elif step_tag and step_tag in rec.question:
        out.append(f"question: contains the step tag {step_tag!r} (steps would be misplaced); remove it from the "
                   "text or train with another --step_tag")
    if not isinstance(rec.steps, list) or not rec.steps:
        out.append("steps: must be a non-empty list of strings")
        return out
    if not isinstance(rec.labels, list) or len(rec.labels) != len(rec.steps):
        n = len(rec.labels) if isinstance(rec.labels, list) else "not a list"
        out.append(f"labels: {n} labels for {len(rec.steps)} steps (need one per step)")
    else:
        for k, y in enumerate(rec.labels):
            if y is not None and _bad_prob(y):
                out.append(f"labels[{k}]: {y!r} is not a number in [0, 1]")
    for k, s in enumerate(rec.steps):
        if not isinstance(s, str) or not s.strip():
            out.append(f"steps[{k}]: empty step")
        elif step_tag and step_tag in s:
            out.append(f"steps[{k}]: contains the step tag {step_tag!r}; remove it from the text")
    if rec.outcome is not None and _bad_prob(rec.outcome):
        out.append(f"outcome: {rec.outcome!r} is not a number in [0, 1]")
    if rec.domain is not None and not isinstance(rec.domain, str):
        out.append("domain: must be a string or null")
    return out


def record_from_json(d: dict) -> Record:
    """Build a Record from the internal JSONL form; raises KeyError/ValueError on bad input."""
    if not isinstance(d, dict):
        raise ValueError("line is not a JSON object")
    schema = d.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise ValueError(f"schema {schema!r} is not supported (this dreamprm reads {SCHEMA_VERSION})")
    missing = [k for k in ("id", "question", "steps") if k not in d]
    if missing:
        raise KeyError(", ".join(missing))
    steps = d["steps"]
    labels = d.get("labels", [None] * len(steps) if isinstance(steps, list) else None)
    return Record(id=str(d["id"]), question=d["question"], steps=steps, labels=labels,
                  outcome=d.get("outcome"), domain=d.get("domain"), meta=d.get("meta") or {})


def write_jsonl(records, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
