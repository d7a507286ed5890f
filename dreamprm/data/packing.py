"""Sample packing: several examples per row, no attention across examples, results per example.

collate() pads every example of a batch to the longest one; with PRM data (lengths from 50 to
thousands of tokens) most of a padded batch is padding. collate_packed() lays the examples end
to end in rows instead and restarts the position ids at every example:

  input_ids, position_ids  [R, S]   R rows (first-fit decreasing), pad only at the end of a row
  attention_mask           None     the backbone builds the mask from the position ids (below)
  tag_pos                  [N, K]   flat indices into the R*S token positions
  every per-example field  [N, ...] exactly as collate() gives them, in the order of `examples`
  seq_row, seq_start, seq_len [N]   where each example sits (select() cuts one out)

so PRM.forward(input_ids, None, tag_pos, position_ids) returns logits [N, K, 2] in the original
example order, and the per-instance losses, weights and meta-pass alignments work unchanged.

How attention stays inside each example (checked by check_attention):
  sdpa / eager: with attention_mask None and position ids that restart, transformers'
    create_causal_mask detects the packed layout (masking_utils.find_packed_sequence_indices) and
    builds a block-diagonal causal mask. The masked-out blocks are still computed by sdpa, so rows
    are at most as long as the batch's longest example (row_tokens default): attention never costs
    more than the padded batch, and every linear layer sees far fewer padding tokens.
  flash_attention_2: the varlen kernel is used from the position ids, but only for a single row
    (transformers' _is_packed_sequence needs batch size 1): pack with one_row=True; nothing is padded
    and attention costs sum(len_i^2).
The pad tail of a row gets positions 0, 1, ... too, so it is a segment of its own and no example
attends to it.
"""

from __future__ import annotations

import math

import torch

from dreamprm.data.loader import check_batch, example_fields
from dreamprm.data.tokenize import Example

PER_EXAMPLE = ("step_mask", "label_mask", "labels", "outcome", "index", "domain")


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row's total <= capacity."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit in a row of {capacity}")
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(examples: list[Example], pad_id: int, row_tokens: int | None = None,
                   one_row: bool = False) -> dict:
    """Packed batch of `examples` (see the module docstring).

    row_tokens: capacity of a row; None = the longest example of the batch (sdpa/eager: the
    attention matrix is never larger than in the padded batch). one_row: every example in one row
    with no padding (flash_attention_2 varlen).
    """
    check_batch(examples, pad_id, "collate_packed")
    lens = [len(e.input_ids) for e in examples]
    cap = sum(lens) if one_row else (row_tokens or max(lens))
    rows = pack_rows(lens, cap)
    n, r = len(examples), len(rows)
    s = max(sum(lens[i] for i in row) for row in rows)
    input_ids = torch.full((r, s), pad_id, dtype=torch.long)
    position_ids = torch.zeros((r, s), dtype=torch.long)
    seq_row, seq_start = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for ri, row in enumerate(rows):
        at = 0
        for i in row:
            input_ids[ri, at:at + lens[i]] = torch.tensor(examples[i].input_ids, dtype=torch.long)
            position_ids[ri, at:at + lens[i]] = torch.arange(lens[i])
            seq_row[i], seq_start[i] = ri, at
            at += lens[i]
        position_ids[ri, at:] = torch.arange(s - at)  # the pad tail: a segment of its own
    # tag positions are flat indices into the R*S tokens
    fields = example_fields(examples, (seq_row * s + seq_start).tolist())
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids, **fields,
            "n_tokens": sum(lens), "seq_row": seq_row, "seq_start": seq_start,
            "seq_len": torch.tensor(lens, dtype=torch.long)}


def is_packed(batch: dict) -> bool:
    return batch.get("position_ids") is not None


def select(batch: dict, i: int) -> dict:
    """Example i of a batch alone, as a padded (unpacked) batch of one: what the exact
    hypergradient method needs for one backward per instance. Works on both layouts."""
    if not is_packed(batch):
        return {k: (x[i:i + 1] if torch.is_tensor(x) and x.dim() > 0 else x) for k, x in batch.items()}
    row, start, n = (int(batch[k][i]) for k in ("seq_row", "seq_start", "seq_len"))
    s = batch["input_ids"].shape[1]
    out = {k: batch[k][i:i + 1] for k in PER_EXAMPLE}
    mask = out["step_mask"]
    tag = (batch["tag_pos"][i:i + 1] - (row * s + start)).masked_fill(~mask, 0)
    ids = batch["input_ids"][row:row + 1, start:start + n]
    out.update(input_ids=ids, attention_mask=torch.ones_like(ids), tag_pos=tag, n_tokens=n)
    if "ids" in batch:
        out["ids"] = [batch["ids"][i]]
    return out


def padding_stats(lengths: list[int], batch_size: int, row_tokens: int | None = None) -> dict:
    """Token slots of consecutive batches of `lengths`: padded, packed in rows, and one row.

    waste = 1 - real tokens / slots. pairs_* count query-key pairs per head and layer (full S x S
    matrices: rows x width^2 for the dense layouts, sum(len^2) for per-example attention); attn_* are
    their ratios to the per-example need.
    """
    real = padded = packed = rows_total = 0
    attn_need = attn_padded = attn_packed = 0
    for b in range(0, len(lengths), batch_size):
        lens = lengths[b:b + batch_size]
        s = max(lens)
        real += sum(lens)
        padded += len(lens) * s
        attn_padded += len(lens) * s * s
        attn_need += sum(x * x for x in lens)
        rows = pack_rows(lens, row_tokens or s)
        width = max(sum(lens[i] for i in row) for row in rows)
        packed += len(rows) * width
        attn_packed += len(rows) * width * width
        rows_total += len(rows)
    n_batches = math.ceil(len(lengths) / batch_size)
    return {"examples": len(lengths), "batches": n_batches, "tokens": real,
            "waste_padded": 1 - real / padded, "waste_packed": 1 - real / packed, "waste_one_row": 0.0,
            "rows_per_batch": rows_total / n_batches, "slots_padded": padded, "slots_packed": packed,
            "pairs_padded": attn_padded, "pairs_packed": attn_packed, "pairs_need": attn_need,
            "attn_padded_over_need": attn_padded / attn_need, "attn_packed_over_need": attn_packed / attn_need}


def check_attention(attn_implementation: str) -> None:
    """Raise unless this transformers keeps packed examples apart for the attention kernel."""
    if attn_implementation == "flash_attention_2":
        return  # varlen from position ids (single row), transformers >= 4.44
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as e:
        import transformers
        raise RuntimeError(f"sample packing with {attn_implementation} needs a transformers that builds the "
                           f"block-diagonal mask from restarting position ids (masking_utils."
                           f"find_packed_sequence_indices, e.g. 5.x); this is {transformers.__version__}. "
                           f"Upgrade transformers, or train without packing") from e
