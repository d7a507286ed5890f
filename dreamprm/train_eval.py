"""Evaluation on --eval_file during training (--eval_every): step metrics sharded over the ranks.

The examples are encoded and cut like the training data; every rank takes part (under ZeRO-3 every
forward needs every rank), and the per-step scores are gathered before the metrics are computed.
"""

from __future__ import annotations

import math


from dreamprm import hypergrad
from dreamprm import metrics as M
from dreamprm.data.loader import collate
from dreamprm.data.readers import load_records
from dreamprm.data.tokenize import encode_records, run_profiles
from dreamprm.errors import DataError
from dreamprm.model import step_probs


def load_eval_examples(cfg, tokenizer, domains: list[str]):
    """(examples, encode stats) of --eval_file, encoded like the training data (same truncation).

    domains: the run's domain table; eval domains outside it are added (the eval does not use them).
    """
    d = cfg.data
    recs = load_records(d.eval_file, d.eval_format, step_tag=cfg.model.step_tag, skip_invalid=d.skip_invalid,
                        format_flag="--eval_format")
    if not any(y is not None for r in recs for y in r.labels):
        raise DataError([f"--eval_file {d.eval_file}: no record has step labels; the evaluation during "
                         "training measures step AUROC / F1 / calibration on labelled steps"])
    examples, st = encode_records(recs, tokenizer=tokenizer, step_tag=cfg.model.step_tag, max_length=d.max_length,
                                  use_chat_template=cfg.model.chat_template,
                                  profile=run_profiles(d.system_prompt, d.prompt_template)[d.profile],
                                  domains=[*domains, *(r.domain for r in recs)])
    if not examples:
        raise DataError([f"--eval_file {d.eval_file}: no example fits in --max_length {d.max_length}"])
    return examples, st


def shard_batches(examples: list, batch_size: int, rank: int, world: int) -> list[list]:
    """This rank's eval batches: examples rank, rank + world, ...; every rank gets the same number of
    batches (under ZeRO-3 every forward needs every rank), so a short shard ends with empty ones."""
    shard = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    return [shard[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def eval_step_metrics(forward_fn, examples: list, batch_size: int, rank: int = 0, world: int = 1,
                      pad_id: int = 0, threshold: float = 0.5, n_bins: int = 10) -> dict:
    """Step metrics of the PRM on step-labelled examples, sharded over the ranks of the process group.

    forward_fn(batch) -> logits [B, K, 2]; call under torch.no_grad with the module in eval mode. Every
    rank must call this (same examples): all ranks run the same number of forwards (an empty batch is
    padded with a real example whose result is dropped), then per-step scores and labels are gathered.
    Returns eval_loss (mean instance loss, the training loss unweighted), eval_step_auroc, eval_f1 (the
    error class at `threshold`, as in `dreamprm evaluate steps`), eval_ece, eval_labelled_steps.
    """
    if not examples:
        raise ValueError("eval_step_metrics: no examples")
    probs, labels, losses = [], [], []
    for chunk in shard_batches(examples, batch_size, rank, world):
        batch = collate(chunk or examples[:1], pad_id)
        logits = forward_fn(batch).float().cpu()
        if not chunk:
            continue
        p = step_probs(logits)
        lm = batch["label_mask"]
        probs += p[lm].tolist()
        labels += batch["labels"][lm].tolist()
        has = lm.any(-1)
        losses += hypergrad.instance_losses(logits, batch)[has].tolist()
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"eval_step_metrics: world={world} but no process group is initialized")
        box = [None] * world
        dist.all_gather_object(box, (probs, labels, losses))
        probs, labels, losses = ([x for part in box for x in part[i]] for i in range(3))
    if not probs:
        return {"eval_loss": math.nan, "eval_step_auroc": math.nan, "eval_f1": math.nan, "eval_ece": math.nan,
                "eval_labelled_steps": 0}
    return {"eval_loss": sum(losses) / len(losses), "eval_step_auroc": M.auroc(probs, labels),
            "eval_f1": M.f1_at(probs, labels, threshold, positive="error")["f1"],
            "eval_ece": M.ece(probs, labels, n_bins)["ece"], "eval_labelled_steps": len(probs)}
