"""Regenerate the bundled demo data: `python -m dreamprm.demo.generate`.

Small MiniF2F-style records (the seed script's JSONL: informal_prefix, formal_statement,
cot_response with `### Step k` headers, cot_steps[].pi, meta_label) for a repeated-doubling
task whose step correctness is known. Domain "noisy" has 40% of its step labels
flipped, so the demo has something for the weights to find; the meta file is clean.
"""

import json
import random
from pathlib import Path


def solution(rng: random.Random, wrong: bool):
    """Repeated doubling: a careless step adds or drops one, so a first error is odd."""
    a = rng.randint(2, 9)
    n = 3
    err_at = rng.randint(0, n - 1) if wrong else n
    steps, labels, x = [], [], a
    for k in range(n):
        y = 2 * x + (rng.choice([-1, 1]) if k == err_at else 0)
        steps.append(f"Double {x} to get {y}")
        labels.append(1.0 if k < err_at else 0.0)
        x = y
    question = f"Double {a} three times."
    formal = f"theorem demo : ({a} : ℕ) * 8 = {8 * a} := by"
    return question, formal, steps, labels, float(x == 8 * a)


def record(rng, i, domain, flip):
    q, formal, steps, labels, outcome = solution(rng, wrong=rng.random() < 0.5)
    if flip:
        labels = [1.0 - y if rng.random() < flip else y for y in labels]
    cot = "\n".join(f"### Step {k + 1}: {s}" for k, s in enumerate(steps))
    return {"id": f"{domain}-{i:04d}", "informal_prefix": q, "formal_statement": formal,
            "cot_response": cot, "cot_steps": [{"pi": y} for y in labels], "meta_label": outcome,
            "domain": domain}


def main():
    rng = random.Random(0)
    out = Path(__file__).parent
    train = [record(rng, i, "clean", 0.0) for i in range(120)] + \
            [record(rng, i, "noisy", 0.4) for i in range(120)]
    rng.shuffle(train)
    meta = [record(rng, i, "meta", 0.0) for i in range(64)]
    for r in meta:  # meta data carries outcomes only: no domain, no step labels used
        del r["domain"]
    for name, rows in (("train.jsonl", train), ("meta.jsonl", meta)):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    main()
