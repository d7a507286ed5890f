"""TrainState: everything a run carries from one update to the next, and what a checkpoint holds of it.

The PRM and its optimizer live in the DeepSpeed engine (saved by it); the rest of the run's state is
here, so the loop keeps no loose state beside it and a resumed run continues exactly:

    step            the last finished update
    wmod, wopt      the weight module and its optimizer (None: fixed weights, --weights_from)
    train_stream    per-rank batch streams (positions, mixture draws, curriculum)
    meta_stream     (None for --baseline)
    src_base        [sources, 3] totals (instances, loss, weight) of the processes before this one
    src_local       the same sums of this process on this rank
    last_w          the weight each training example got when last trained on (-1: not yet); the
                    instance net's weights depend on features, so these are the ones it reports
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamprm.dist import all_reduce_
from dreamprm.errors import CheckpointError


@dataclass
class TrainState:
    step: int
    wmod: torch.nn.Module
    wopt: torch.optim.Optimizer | None
    train_stream: object
    meta_stream: object | None
    source_of: torch.Tensor  # training example -> its source
    src_base: torch.Tensor
    src_local: torch.Tensor
    last_w: torch.Tensor

    @classmethod
    def new(cls, wmod, wopt, train_stream, meta_stream, source_of: list[int], n_sources: int) -> TrainState:
        base = torch.zeros(n_sources, 3, dtype=torch.float64)
        return cls(0, wmod, wopt, train_stream, meta_stream, torch.tensor(source_of, dtype=torch.long), base,
                   torch.zeros_like(base), torch.full((len(source_of),), -1.0))

    def observe(self, recent: list, window: torch.Tensor) -> None:
        """Fold an update's micro-batches into the run's totals and into the metrics window's [S, 3] sums."""
        for r in recent:
            idx = r["batch"]["index"].cpu()
            w = r["weights"].cpu().float()
            self.last_w[idx] = w
            vals = torch.stack([torch.ones(len(w)), r["features"][:, 0].cpu().float(), w], 1).double()
            window.index_add_(0, self.source_of[idx], vals)
            self.src_local.index_add_(0, self.source_of[idx], vals)

    def source_totals(self) -> torch.Tensor:
        """The run's per-source totals over every rank and process so far (a collective)."""
        return self.src_base + all_reduce_(self.src_local.clone())

    def state_dict(self) -> tuple[dict, dict]:
        """(shared, per_rank): shared is the same on every rank (rank 0 writes it); per_rank differs by rank.
        A collective (the source totals are summed over the ranks)."""
        shared = {"step": self.step, "weights": self.wmod.state_dict(),
                  "weights_opt": self.wopt.state_dict() if self.wopt is not None else {},
                  "source_totals": self.source_totals().tolist()}
        per_rank = {"train_stream": self.train_stream.state_dict(),
                    "meta_stream": self.meta_stream.state_dict() if self.meta_stream is not None else {},
                    "last_w": self.last_w.clone()}
        return shared, per_rank

    def load_state_dict(self, shared: dict, per_rank: dict, world_changed: bool) -> None:
        """world_changed: the checkpoint was written by another number of ranks; the data streams go on at the
        same fraction of the epoch, split over the new ranks (BatchStream.load_state_dict)."""
        for flag, stream, saved in (("--train_file", self.train_stream, per_rank["train_stream"]),
                                    ("--meta_file", self.meta_stream, per_rank["meta_stream"])):
            if stream is None:
                continue
            try:  # before the weights: data of another size misfits an instance table too, less clearly
                stream.load_state_dict(saved, allow_world_change=world_changed)
            except ValueError as e:  # resume.check_data refuses a size change earlier, before the model is built
                raise CheckpointError(f"{flag}: the checkpoint's data stream cannot go on in this run's data ({e}); "
                                      "resume with the same data (a --mix or --curriculum stream also on the same "
                                      "number of ranks), or start a new run in another --output_dir") from e
        self.step = shared["step"]
        self.wmod.load_state_dict(shared["weights"])
        if self.wopt is not None:
            self.wopt.load_state_dict(shared["weights_opt"])
        self.src_base = torch.tensor(shared.get("source_totals", self.src_base.tolist()), dtype=torch.float64)
        if "last_w" in per_rank:  # checkpoints before 2026-12 lack it: unseen, as in a new run
            self.last_w = per_rank["last_w"].clone()
