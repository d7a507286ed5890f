"""Batches of Examples for one rank: collate() and a resumable, sharded BatchStream.

Examples are already token ids, so collating is a few tensor copies and BatchStream does it
in the main process by default. with_workers() moves collation into DataLoader worker
processes (--num_workers); the batch order is still decided in the main process, and the
resume state is the one after the last batch the loop actually took, not after the
batches the workers prefetched.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from dreamprm.data.tokenize import Example


def check_batch(examples: list[Example], pad_id: int, who: str) -> None:
    if not examples:
        raise ValueError(f"{who}: empty batch")
    if pad_id is None:
        raise ValueError(f"{who}: pad_id is None; the tokenizer has no pad token (set tokenizer.pad_token, "
                         "e.g. to its eos token)")


def example_fields(examples: list[Example], tag_base: list[int]) -> dict:
    """The per-example part of a batch, shared by the padded and packed layouts: tag positions [N, K]
    (example i's positions offset by tag_base[i]; unused slots point at tag_base[i]), step and label
    masks, labels, outcome, index, domain and record ids. Dtypes are explicit: soft labels stay float32,
    masks are bool (TRL PR 2127: labels cast to bool turned -100 into True)."""
    n, k = len(examples), max(len(e.tag_pos) for e in examples)
    tag_pos = torch.tensor(tag_base, dtype=torch.long)[:, None].repeat(1, k)
    step_mask = torch.zeros((n, k), dtype=torch.bool)
    labels = torch.full((n, k), math.nan, dtype=torch.float32)
    for i, e in enumerate(examples):
        m = len(e.tag_pos)
        tag_pos[i, :m] += torch.tensor(e.tag_pos, dtype=torch.long)
        step_mask[i, :m] = True
        labels[i, :m] = torch.tensor(e.labels, dtype=torch.float32)
    label_mask = step_mask & ~torch.isnan(labels)
    return {
        "tag_pos": tag_pos,
        "step_mask": step_mask,
        "label_mask": label_mask,
        "labels": torch.where(label_mask, labels, torch.zeros_like(labels)),
        "outcome": torch.tensor([e.outcome for e in examples], dtype=torch.float32),
        "index": torch.tensor([e.index for e in examples], dtype=torch.long),
        "domain": torch.tensor([e.domain for e in examples], dtype=torch.long),
        "ids": [e.id for e in examples],  # record ids, for error messages
    }


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded batch: one example per row."""
    check_batch(examples, pad_id, "collate")
    b, s = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, s), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :len(e.input_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **example_fields(examples, [0] * b),
            "n_tokens": int(attention_mask.sum())}


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Batches one rank takes per epoch: n // world samples, the last batch may be short."""
    return math.ceil((n // world) / batch_size)


class BatchStream:
    """Endless stream of collated batches for one rank; epochs wrap around.

    Epoch e shuffles all examples with numpy's generator seeded from the pair (seed, e), the
    same on every rank (torch's CPU generator keeps only 32 bits of a seed, so (seed, e) packed
    into one int collides across seeds); rank r takes the r-th of `world` equal contiguous slices of that permutation.
    The n % world samples left over are not used in that epoch (a different few each epoch
    when shuffling), so every rank has the same number of batches and no sample is
    duplicated. The last batch of an epoch holds the remaining per_rank % batch_size samples
    (same size on every rank); batches never straddle epochs.

    state_dict() = {epoch, pos (samples this rank took in this epoch), n, world, seed}. It is
    the same on every rank, so saving rank 0's copy is enough.
    """

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, rank: int = 0,
                 world: int = 1, seed: int = 0, shuffle: bool = True, collate_fn=collate):
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size {batch_size} must be >= 1")
        if not 0 <= rank < world:
            problems.append(f"rank {rank} is not in [0, world={world})")
        if seed < 0:
            problems.append(f"seed {seed} must be >= 0")
        if world >= 1 and len(examples) < world:
            problems.append(f"{len(examples)} examples cannot give every one of {world} ranks a sample")
        if pad_id is None:
            problems.append("pad_id is None; set tokenizer.pad_token (e.g. to its eos token)")
        if problems:
            raise ValueError("BatchStream: " + "; ".join(problems))
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.collate_fn = collate_fn  # (examples, pad_id) -> batch; e.g. data.packing.collate_packed
        self.per_rank = len(examples) // world
        self.batches_per_epoch = batches_per_epoch(len(examples), batch_size, world)
        self.epoch, self.pos = 0, 0
        self._order: list[int] | None = None  # this rank's sample order in self.epoch

    def _rank_order(self, epoch: int) -> list[int]:
        n = len(self.examples)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()

    def __iter__(self):
        return self

    def next_indices(self) -> list[int]:
        """Advance by one batch and return its example indices."""
        if self.pos >= self.per_rank:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._rank_order(self.epoch)
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return idx

    def __next__(self) -> dict:
        return self.collate_fn([self.examples[i] for i in self.next_indices()], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": len(self.examples),
                "world": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict, allow_world_change: bool = False) -> None:
        """Continue exactly after the last batch taken before state_dict() was called.

        A different dataset size or seed is an error (it would not be the same order). A
        different world size is an error unless allow_world_change: then the stream goes
        on at the same fraction of the epoch, which is approximate (some samples of that
        epoch are seen twice or not at all).
        """
        problems = [f"{k} was {state[k]} in the checkpoint but is {v} now"
                    for k, v in (("n", len(self.examples)), ("seed", self.seed)) if state[k] != v]
        pos = state["pos"]
        if state["world"] != self.world:
            if not allow_world_change:
                problems.append(f"world was {state['world']} in the checkpoint but is {self.world} now "
                                f"(resume on the same number of ranks, or allow a world change)")
            pos = min(self.per_rank, pos * state["world"] // self.world)
        if problems:
            raise ValueError("BatchStream.load_state_dict: " + "; ".join(problems))
        self.epoch, self.pos, self._order = state["epoch"], pos, None


class WorkerStream:
    """A BatchStream whose batches are collated by DataLoader worker processes.

    The main process draws each batch's indices from the stream and remembers the stream
    state after it; the DataLoader keeps batch order, so popping one state per consumed
    batch gives exactly the state an in-process stream would have.
    """

    def __init__(self, stream: BatchStream, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        self._pending: deque = deque()
        self._state = stream.state_dict()
        self._it = None

    def _indices(self):
        while True:
            idx = self.stream.next_indices()
            self._pending.append(self.stream.state_dict())
            yield idx

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            loader = DataLoader(self.stream.examples, batch_sampler=self._indices(), num_workers=self.num_workers,
                                collate_fn=partial(self.stream.collate_fn, pad_id=self.stream.pad_id))
            self._it = iter(loader)
        batch = next(self._it)
        self._state = self._pending.popleft()
        return batch

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict, allow_world_change: bool = False) -> None:
        if self._it is not None:
            raise RuntimeError("WorkerStream.load_state_dict must be called before the first batch")
        self.stream.load_state_dict(state, allow_world_change)
        self._state = self.stream.state_dict()


def with_workers(stream: BatchStream, num_workers: int):
    """The stream itself for num_workers == 0, else a WorkerStream around it."""
    return WorkerStream(stream, num_workers) if num_workers > 0 else stream
