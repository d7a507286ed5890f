"""Several data sources in one run: reading them, mixture probabilities, a curriculum, and the
resumable per-rank sampler that draws batches from them. The source-spec grammar
(``PATH[,key=value,...]``, Source, parse_sources) is the config's: dreamprm.config.

Plain python and numpy, no torch: the loop feeds learned domain weights in as a list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dreamprm.config import MIXES, Source
from dreamprm.data.readers import load_records
from dreamprm.errors import DataError


def read_sources(train: list[Source], meta: list[Source], step_tag: str, skip_invalid: bool
                 ) -> tuple[list[list], list[list], list[str]]:
    """(records of every training source, of every meta source, problems). Problems, each naming the source
    and its flag: files that cannot be read or have no valid record, training sources without step labels
    (outcome-only data belongs in --meta_file), meta sources without outcome labels."""
    problems = []

    def read(s):
        try:
            flag = {"--train_file": "--train_format", "--meta_file": "--meta_format"}.get(s.flag, "--train_format")
            return load_records(s.path, s.format, step_tag=step_tag, skip_invalid=skip_invalid,
                                format_flag=f"{flag} (or format=F in the {s.flag} spec)")
        except DataError as e:
            # reader problems start with FILE:LINE; the flag (and source name) go in front
            problems.extend(f"{s.flag} {q}" if q.startswith(s.path) else f"{s.where()}: {q}" for q in e.problems)
            return []

    train_recs, meta_recs = [read(s) for s in train], [read(s) for s in meta]
    labelled = [s.name for s, recs in zip(train, train_recs) if any(y is not None for r in recs for y in r.labels)]
    for s, recs in zip(train, train_recs):
        unlabelled = [r.id for r in recs if all(y is None for y in r.labels)]
        if unlabelled:
            others = [n for n in labelled if n != s.name]
            problems.append(f"{s.where()}: {len(unlabelled)} records have no step labels (e.g. {unlabelled[:3]}); "
                            "training needs step labels (use them as --meta_file)"
                            + (f"; the other training sources {others} do have them" if others else ""))
    for s, recs in zip(meta, meta_recs):
        if recs and all(r.outcome is None for r in recs):
            problems.append(f"{s.where()}: no record has an outcome label; the meta pass needs solutions labelled "
                            "right/wrong (field `outcome`, `meta_label`, `passed`, ...)")
    return train_recs, meta_recs, problems


def mixture_probs(sizes: list[int], mix: str, alpha: float, weights: list[float],
                  domain_weights: list[float] | None = None) -> np.ndarray:
    """Sampling probability of each source.

    size: n_s / sum n; temperature: n_s^alpha (alpha 1 = size, 0 = uniform); weights: the sources'
    weight=; learned: n_s^alpha times the learned weight of the source's domain (domain_weights, one
    per source; before any is known, 1).
    """
    n = np.asarray(sizes, dtype=np.float64)
    if mix == "size":
        p = n
    elif mix == "temperature":
        p = n ** alpha
    elif mix == "weights":
        p = np.asarray(weights, dtype=np.float64)
    elif mix == "learned":
        dw = np.ones_like(n) if domain_weights is None else np.asarray(domain_weights, dtype=np.float64)
        p = n ** alpha * dw
    else:
        raise ValueError(f"unknown mix {mix!r} (choose from {', '.join(MIXES)})")
    p = np.where(n > 0, p, 0.0)
    if not (np.all(np.isfinite(p)) and p.sum() > 0):
        raise ValueError(f"mixture {mix}: weights {p.tolist()} do not give a distribution (all zero or non-finite)")
    return p / p.sum()


@dataclass
class Curriculum:
    """Easy to hard: at batch t each source samples from its easiest fraction(t) share.

    fraction(t) = start + (1 - start) * r (linear) or sqrt(start^2 + (1 - start^2) * r) (sqrt: the
    "competence" schedule of Platanios et al. 2019), r = min(1, t / ramp_batches).
    """
    start: float
    ramp_batches: int
    schedule: str = "linear"

    def fraction(self, t: int) -> float:
        r = min(1.0, t / max(1, self.ramp_batches))
        if self.schedule == "sqrt":
            return math.sqrt(self.start ** 2 + (1 - self.start ** 2) * r)
        return self.start + (1 - self.start) * r


class MixtureStream:
    """Endless per-rank batches drawn from several sources (same interface as loader.BatchStream).

    Batch t of rank r: its sources are drawn i.i.d. from the mixture probabilities with numpy's
    generator seeded (seed, rank, t); each source then yields its next example from its own pass:
    a permutation seeded (seed, source, pass) of the source's current pool, split into `world` equal
    slices (rank r takes slice r), as in BatchStream. The pool is the whole source, or with a
    curriculum its easiest max(world, ceil(fraction(t) * n_s)) examples, read when a pass starts.

    state_dict(): {t, passes: [[pass, pos, pool] per source], probs, sizes, seed, world}. It differs
    between ranks (each rank draws its own sources), so every rank saves its own copy.
    """

    def __init__(self, examples: list, source_of: list[int], batch_size: int, pad_id: int, probs,
                 rank: int = 0, world: int = 1, seed: int = 0, curriculum: Curriculum | None = None,
                 difficulty: list[float] | None = None, collate_fn=None):
        from dreamprm.data.loader import collate  # loader imports torch; keep this module light

        n_src = max(source_of) + 1 if source_of else 0
        members = [[] for _ in range(n_src)]
        for i, s in enumerate(source_of):
            members[s].append(i)
        if difficulty is not None:  # easiest first; ties keep file order
            members = [sorted(m, key=lambda i: (difficulty[i], i)) for m in members]
        small = [s for s, m in enumerate(members) if len(m) < world]
        if small or batch_size < 1 or not 0 <= rank < world or len(examples) != len(source_of):
            raise ValueError(f"MixtureStream: sources {small} have fewer examples than ranks ({world}), or "
                             f"batch_size {batch_size} < 1, or rank {rank} not in [0, {world}), or "
                             f"{len(examples)} examples for {len(source_of)} source ids")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world, self.seed = rank, world, seed
        self.collate_fn = collate_fn or collate
        self.members, self.curriculum = members, curriculum
        self.sizes = [len(m) for m in members]
        self.set_probs(probs)
        self.t = 0
        self.passes = [[-1, 0, 0] for _ in members]  # [pass, pos in this rank's slice, pool]; -1: none yet
        self._orders: dict[int, list[int]] = {}

    def set_probs(self, probs) -> None:
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (len(self.members),) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"MixtureStream.set_probs: {p.tolist()} is not a distribution over "
                             f"{len(self.members)} sources")
        self.probs = p / p.sum()

    def pool_size(self, s: int, t: int) -> int:
        n = self.sizes[s]
        if self.curriculum is None:
            return n
        return min(n, max(self.world, math.ceil(self.curriculum.fraction(t) * n)))

    def _order(self, s: int) -> list[int]:
        if s not in self._orders:
            k, _, pool = self.passes[s]
            perm = np.random.default_rng([self.seed, 1 + s, k]).permutation(pool)
            per_rank = pool // self.world
            mine = perm[self.rank * per_rank:(self.rank + 1) * per_rank]
            self._orders[s] = [self.members[s][j] for j in mine]
        return self._orders[s]

    def next_indices(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.rank, self.t])
        out = []
        for s in rng.choice(len(self.members), size=self.batch_size, p=self.probs).tolist():
            st = self.passes[s]
            if st[0] < 0 or st[1] >= st[2] // self.world:  # start the source's next pass
                self.passes[s] = st = [st[0] + 1, 0, self.pool_size(s, self.t)]
                self._orders.pop(s, None)
            out.append(self._order(s)[st[1]])
            st[1] += 1
        self.t += 1
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.collate_fn([self.examples[i] for i in self.next_indices()], self.pad_id)

    def state_dict(self) -> dict:
        return {"kind": "mixture", "t": self.t, "passes": [list(p) for p in self.passes],
                "probs": self.probs.tolist(), "sizes": list(self.sizes), "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict, allow_world_change: bool = False) -> None:
        """Continue exactly after the last batch taken before state_dict(); the same sources, sizes,
        seed and world size are required (a different world would not be the same draws)."""
        problems = [f"{k} was {state.get(k)} in the checkpoint but is {v} now"
                    for k, v in (("kind", "mixture"), ("sizes", self.sizes), ("seed", self.seed),
                                 ("world", self.world)) if state.get(k) != v]
        if problems:
            raise ValueError("MixtureStream.load_state_dict: " + "; ".join(problems))
        self.t = int(state["t"])
        self.passes = [list(map(int, p)) for p in state["passes"]]
        self.set_probs(state["probs"])
        self._orders = {}
