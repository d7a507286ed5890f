"""Hook alignments (dreamprm.persample) against the per-instance autograd loop: the figures behind
tests/test_persample.py, printed as a table.

    python bench/persample_check.py

The built-in tiny Qwen2 (2 layers, hidden 64), 5 examples of 9-29 tokens with 1-4 step tags, a random v
(0.01 N(0, 1) per element), LoRA (r 4, B moved off zero) and full fine-tuning, fp32 and bf16, padded and
packed batches (rows of 60 tokens).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_persample import build, compare, examples, losses_fn, random_v  # noqa: E402

from dreamprm import persample  # noqa: E402
from dreamprm.data.loader import collate  # noqa: E402
from dreamprm.data.packing import collate_packed  # noqa: E402


def main() -> int:
    print("| train | precision | batch | instances | cosine | relative L2 | slow-path parameters |")
    print("|---|---|---|---:|---:|---:|---|")
    for mode in ("lora", "full"):
        for precision in ("fp32", "bf16"):
            for layout in ("padded", "packed"):
                prm, tok = build(mode, precision)
                ex = examples()
                b = collate(ex, tok.pad_token_id) if layout == "padded" else \
                    collate_packed(ex, tok.pad_token_id, row_tokens=60)
                params = {n: p for n, p in prm.named_parameters() if p.requires_grad}
                v = random_v(params)
                a, slow = persample.exact(prm, params, v, b, losses_fn(prm), head=prm.score)
                cos, rel = compare(a, persample.reference(params, v, b, losses_fn(prm)))
                print(f"| {mode} | {precision} | {layout} | {len(ex)} | {cos:.8f} | {rel:.2e} | {slow or 'none'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
