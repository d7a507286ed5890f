"""Hook alignments (dreamprm.persample) against the per-instance autograd loop: the figures behind
tests/test_persample.py, printed as a table.

    python bench/persample_check.py

The built-in tiny Qwen2 (2 layers, hidden 64), 5 examples of 9-29 tokens with 1-4 step tags, a random v
(0.01 N(0, 1) per element), LoRA (r 4, B moved off zero) and full fine-tuning, fp32 and bf16, padded and
packed batches (rows of 60 tokens). The setup's one home: tests/test_persample.py loads it from here.
"""

import math

import torch

from dreamprm import hypergrad, persample
from dreamprm.config import ModelConfig
from dreamprm.data.loader import collate
from dreamprm.data.packing import collate_packed
from dreamprm.data.tokenize import Example
from dreamprm.model import build_prm
from dreamprm.tiny import default_tiny_dir


def examples(n=5, seed=0, vocab=540) -> list[Example]:
    """Random token sequences of different lengths with 1-4 tags each (lengths 9..29)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(9, 30, (1,), generator=g))
        k = int(torch.randint(1, 5, (1,), generator=g))
        tags = sorted(torch.randperm(length - 1, generator=g)[:k].add(1).tolist())
        labels = torch.rand(k, generator=g).tolist()
        if k > 1:
            labels[0] = math.nan  # an unlabelled step
        out.append(Example(input_ids=torch.randint(4, vocab, (length,), generator=g).tolist(), tag_pos=tags,
                           labels=labels, outcome=float(i % 2), index=i, domain=0, n_steps=k, n_kept=k,
                           id=f"r{i}"))
    return out


def build(mode: str, precision: str = "fp32"):
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=str(default_tiny_dir()), mode=mode, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      attn_implementation="sdpa")
    prm, tok = build_prm(cfg, precision)
    if mode == "lora":  # B starts at zero: move it so every LoRA factor has a non-trivial gradient
        with torch.no_grad():
            for n, p in prm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return prm.eval(), tok


def random_v(params: dict, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(p.shape, generator=g) * 0.01 for p in params.values()}


def losses_fn(prm):
    def f(b):
        return hypergrad.instance_losses(prm(b["input_ids"], b["attention_mask"], b["tag_pos"],
                                             b.get("position_ids")), b)
    return f


def compare(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Cosine and relative L2 distance, in double."""
    cos = torch.nn.functional.cosine_similarity(a.double(), ref.double(), dim=0).item()
    rel = ((a.double() - ref.double()).norm() / ref.double().norm()).item()
    return cos, rel


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
