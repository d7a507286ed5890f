"""A run's data, assembled once: its sources read and checked, encoded, and drawn from as batches.

    read_run_records(cfg, needs_meta)         every source's records, or one DataError with every problem
    run_data(cfg, tokenizer, rank, world, records) -> RunData   domains, profiles, encoded examples
    transferred(cfg, data, records)           --weights_from: the fixed weight of every training example
    train_stream / meta_stream                the resumable per-rank batch streams over them

The trainer and the pre-flight checks call the same functions, so a problem a job would hit is found
before any rank starts. Nothing here imports deepspeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from dreamprm.config import Config, Source, run_sources
from dreamprm.data.learned import Learned, read_learned, run_sources_of, stale_problem, written_at
from dreamprm.data.loader import BatchStream, collate, with_workers
from dreamprm.data.mixing import Curriculum, MixtureStream, mixture_probs, read_sources
from dreamprm.data.packing import check_attention, collate_packed
from dreamprm.data.tokenize import Example, Profile, domain_table, encode_records, profile_problems, run_profiles
from dreamprm.errors import DataError, WeightsError
from dreamprm.hypergrad import StepLoss
from dreamprm.model import resolve_attn
from dreamprm.runlog import print0


@dataclass
class RunData:
    train_ex: list[Example]
    meta_ex: list[Example]
    domains: list[str]
    train_sources: list[Source]
    meta_sources: list[Source]
    source_of: list[int]  # training example -> its source
    difficulty: list[float] | None  # training example -> curriculum difficulty (None: no curriculum)
    profiles: dict[str, Profile]  # profile name -> Profile, those the sources use
    pos_fraction: float  # positive share of the training step labels (hard-rounded with --hard_labels)


def data_paths(cfg: Config) -> tuple[str, str, str, str]:
    """(train file(s), train format, meta file(s), meta format) for messages; several sources are joined by
    ', '. Empty paths mean the demo data."""
    train, meta = run_sources(cfg)
    return (", ".join(s.path for s in train), cfg.data.train_format if cfg.data.train_file else "minif2f",
            ", ".join(s.path for s in meta), cfg.data.meta_format if cfg.data.train_file else "minif2f")


def read_run_records(cfg: Config, needs_meta: bool) -> tuple[list[list], list[list]]:
    """The records of every source (mixing.read_sources), or one DataError listing every source's problems."""
    train_src, meta_src = run_sources(cfg)
    train, meta, problems = read_sources(train_src, meta_src if needs_meta else [], cfg.model.step_tag,
                                         cfg.data.skip_invalid)
    if problems:
        raise DataError(problems)
    return train, meta


def run_data(cfg: Config, tokenizer, rank: int, needs_meta: bool, world: int = 1, records=None) -> RunData:
    """Read (or take from read_run_records), validate and tokenize every source; every count is printed.

    Each source gets its domain (Source.domain, else the records' own) and its prompt profile. Training
    examples of all sources are concatenated in source order, Example.index dense over them.
    """
    train_src, meta_src = run_sources(cfg)
    train_recs, meta_recs = records if records is not None else read_run_records(cfg, needs_meta)
    for s, recs in zip(train_src + meta_src, train_recs + meta_recs):
        if s.domain is not None:
            for r in recs:
                r.domain = s.domain
    meta_kept = []
    for s, recs in zip(meta_src, meta_recs):
        no_outcome = [r.id for r in recs if r.outcome is None]
        if no_outcome:
            print0(f"meta  {s.where()}: left out {len(no_outcome)} records without an outcome label "
                   f"(e.g. {no_outcome[:3]})", rank=rank)
        meta_kept.append([r for r in recs if r.outcome is not None])
    domains = domain_table([r.domain for recs in train_recs + meta_kept for r in recs])
    all_profiles = run_profiles(cfg.data.system_prompt, cfg.data.prompt_template)
    used = {s.profile or cfg.data.profile for s in train_src + meta_src}
    problems = [q for name in sorted(used) for q in profile_problems(all_profiles[name])]
    if cfg.data.curriculum == "difficulty":
        problems += _difficulty_problems(train_src, train_recs)
    if problems:
        raise DataError(problems)

    def encode(sources, recs_per_source, what):
        out, source_of = [], []
        for k, (s, recs) in enumerate(zip(sources, recs_per_source)):
            ex, st = encode_records(recs, tokenizer=tokenizer, step_tag=cfg.model.step_tag,
                                    max_length=cfg.data.max_length, use_chat_template=cfg.model.chat_template,
                                    domains=domains, profile=all_profiles[s.profile or cfg.data.profile])
            print0(f"{what} {s.where()}: {st}", rank=rank)
            for e in ex:
                e.index += len(out)
            out += ex
            source_of += [k] * len(ex)
            need = world if (len(sources) > 1 or what == "meta ") else 1
            if len(ex) < max(1, need):
                problems.append(f"{s.where()}: {len(ex)} usable examples (within --max_length "
                                f"{cfg.data.max_length}); each source needs at least {max(1, need)} (one per rank)")
        return out, source_of

    train_ex, source_of = encode(train_src, train_recs, "train")
    meta_ex = encode(meta_src, meta_kept, "meta ")[0] if needs_meta else []
    checks = [("--train_file", train_ex)] + ([("--meta_file", meta_ex)] if needs_meta else [])
    batch = {"--train_file": ("--batch_size", cfg.train.batch_size),
             "--meta_file": ("--meta_batch_size", cfg.meta.meta_batch_size)}
    for flag, ex in checks:  # every rank needs at least one example of each, and a whole batch
        where = f"{flag} {data_paths(cfg)[0 if flag == '--train_file' else 2]}"
        bflag, size = batch[flag]
        if len(ex) < world:
            problems.append(f"{where}: {len(ex)} usable examples (within --max_length {cfg.data.max_length}) "
                            f"cannot give each of {world} ranks one; add data or use at most {max(1, len(ex))} ranks")
        elif size > len(ex) // world:  # else every batch would silently be short
            problems.append(f"{bflag} {size}: more than the {len(ex) // world} usable examples per rank of {where} "
                            f"({len(ex)} over {world} rank(s)); use {bflag} {len(ex) // world} or less, or add data"
                            + (" (its default is --batch_size)" if bflag == "--meta_batch_size" else ""))
    if problems:
        raise DataError(problems)
    _warn_meta_overlap(train_ex, meta_ex, rank)
    labels = [(y >= 0.5) if cfg.train.hard_labels else y for e in train_ex for y in e.labels if not math.isnan(y)]
    pos = float(sum(labels) / len(labels)) if labels else math.nan
    print0(f"train step labels: {len(labels)} labelled steps, positive fraction {pos:.4f}"
           + (" (labels rounded to 0/1)" if cfg.train.hard_labels else ""), rank=rank)
    return RunData(train_ex, meta_ex, domains, train_src, meta_src, source_of,
                   _difficulty(cfg, train_ex, source_of, train_recs), {n: all_profiles[n] for n in sorted(used)}, pos)


def _warn_meta_overlap(train_ex: list, meta_ex: list, rank: int) -> None:
    """The meta set is meant to be held out: say how many meta examples are training examples as well."""
    seen = {tuple(e.input_ids) for e in train_ex}
    same = [e.id for e in meta_ex if tuple(e.input_ids) in seen]
    if same:
        print0(f"warning: {len(same)} of {len(meta_ex)} meta examples are identical to training examples "
               f"(e.g. {same[:3]}); the meta set is meant to be held out, or the weights learn to favour "
               "what they are scored on", rank=rank)


def _difficulty_of(r) -> float | None:
    """A record's meta.difficulty as a finite float, None if it has none usable (not a mapping, not a number,
    NaN, inf, or an integer past the float range)."""
    v = r.meta.get("difficulty") if isinstance(r.meta, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


SHOWN = 10  # ids or domains named in one message


def _some(items: list, total: int | None = None) -> str:
    total = len(items) if total is None else total
    return ", ".join(map(str, items[:SHOWN])) + (f" and {total - SHOWN} more" if total > SHOWN else "")


def record_weights(cfg: Config, train_src: list[Source], train_recs: list[list],
                   learned: Learned | None = None) -> tuple[list[dict], list[str]]:
    """--weights_from: (per training source, record id -> its fixed weight; notes to print), or WeightsError naming
    every mismatch. train_recs: read_run_records' (domain= of the sources not yet applied).

    A domain_table run's weights go by domain name (a larger dataset's domains get the weight the proxy learned
    for them); any other run's by record id, and by source where its rows name one. A record with no learned
    weight (the proxy left it out, or never trained on it) gets --unmatched_weight; rows of records this run does
    not have mean the weights were learned on other data, which is refused, and so are weights that are not those
    of their run's newest intact checkpoint (Learned.stale)."""
    flag = f"--weights_from {cfg.meta.weights_from}"
    learned = learned or read_learned(cfg.meta.weights_from, "--weights_from", allow_file=True)
    theirs = run_sources_of(learned)
    their_files = ", ".join(s.path for s in theirs) or "(no config.yaml beside it)"
    ours = ", ".join(s.path for s in train_src)
    domain_of = [[s.domain if s.domain is not None else r.domain for r in recs]
                 for s, recs in zip(train_src, train_recs)]
    got: list[dict] = [{} for _ in train_src]
    problems, notes = [], []
    stale = learned.stale()
    if stale:
        problems.append(stale_problem(flag, stale))
    policy = cfg.meta.unmatched_weight
    if learned.kind == "domain_table":
        table: dict = {}
        for _, row in learned.rows:
            if row["weight"] is not None:
                table.setdefault(row["domain"], []).append(row["weight"])
        table = {d: sum(v) / len(v) for d, v in table.items()}
        unseen: dict = {}
        for k, recs in enumerate(train_recs):
            for r, dom in zip(recs, domain_of[k]):
                if dom in table:
                    got[k][r.id] = table[dom]
                elif policy == "one":
                    got[k][r.id] = 1.0
                else:
                    unseen[dom] = unseen.get(dom, 0) + 1
        if unseen:
            problems.append(f"{flag}: domain(s) {_some([f'{d!r} ({n} records)' for d, n in unseen.items()])} were "
                            f"never seen by the run that learned the domain weights (its domains: "
                            f"{_some(sorted(map(repr, table)))}); pass --unmatched_weight one to weigh them 1, or "
                            "give their sources a learned domain (--train_file PATH,domain=D)")
        how = f"by domain ({len(table)} learned domains)"
    else:
        names = [s.name for s in train_src]
        owners: dict = {}
        for k, recs in enumerate(train_recs):
            for r in recs:
                owners.setdefault(r.id, []).append(k)
        extra, twice = [], []
        for n, row in learned.rows:
            rid = row["id"]
            if "source" in row:
                k = names.index(row["source"]) if row["source"] in names and names.index(row["source"]) in \
                    owners.get(rid, []) else None
            else:
                ks = owners.get(rid, [])
                k = ks[0] if len(ks) == 1 else None
                if len(ks) > 1:
                    twice.append(f"{rid!r} (line {n}: in {', '.join(names[j] for j in ks)})")
                    continue
            if k is None:
                extra.append(f"{rid!r} (line {n})")
            elif row["weight"] is not None:  # null: the instance net never trained on it, nothing learned
                got[k][rid] = row["weight"]
        if extra:
            problems.append(f"{flag}: {len(extra)} of {len(learned.rows)} rows of {learned.path} name records "
                            f"that are in no training source of this run: {_some(extra)}; the weights were "
                            f"learned on {their_files}, this run trains on {ours}: train on the data the "
                            "weights were learned on, or learn weights on this data")
        if twice:
            problems.append(f"{flag}: {len(twice)} rows name no source and their id is in several training sources "
                            f"of this run: {_some(twice)}; give the records distinct ids")
        missing = [(k, r, dom) for k, recs in enumerate(train_recs) for r, dom in zip(recs, domain_of[k])
                   if r.id not in got[k]]
        if missing and policy == "error":
            total = sum(map(len, train_recs))
            problems.append(f"{flag}: {len(missing)} of {total} training records have no learned weight: "
                            f"{_some([f'{r.id!r} ({names[k]})' for k, r, _ in missing])}; the weights were learned "
                            f"on {their_files} (records it left out or never trained on have none): pass "
                            "--unmatched_weight domain_mean (the mean learned weight of their domain) or one")
        elif missing:
            by_dom: dict = {}
            for k, recs in enumerate(train_recs):
                for r, dom in zip(recs, domain_of[k]):
                    if r.id in got[k]:
                        by_dom.setdefault(dom, []).append(got[k][r.id])
            mean = {d: sum(v) / len(v) for d, v in by_dom.items()}
            empty = sorted({repr(dom) for _, _, dom in missing if dom not in mean})
            if policy == "domain_mean" and empty:
                problems.append(f"{flag}: --unmatched_weight domain_mean: domain(s) {_some(empty)} have no record "
                                "with a learned weight to average; use --unmatched_weight one")
            for k, r, dom in missing:
                got[k][r.id] = mean.get(dom, 1.0) if policy == "domain_mean" else 1.0
        how = "by record id"
        if missing and not problems:
            notes.append(f"{len(missing)} training records without a learned weight get --unmatched_weight {policy}")
    if problems:
        raise WeightsError("\n".join(problems))
    if theirs and sorted(str(Path(s.path).resolve()) for s in theirs) != sorted(str(Path(s.path).resolve())
                                                                               for s in train_src):
        notes.append(f"the weights were learned on {their_files}; this run trains on {ours}")
    notes.insert(0, f"weights from {learned.path} ({learned.label}), {written_at(learned.step)}, fixed: no meta "
                    f"pass, matched {how}")
    return got, notes


def transferred(cfg: Config, data: RunData, train_recs: list[list], rank: int = 0) -> list[float]:
    """The fixed weight of every training example (index order) for --weights_from; the matching printed."""
    got, notes = record_weights(cfg, data.train_sources, train_recs)
    w = [got[k][e.id] for e, k in zip(data.train_ex, data.source_of)]
    for n in notes:
        print0(n, rank=rank)
    print0(f"transferred weights of {len(w)} training examples: mean {sum(w) / len(w):.4f}, min {min(w):.4f}, "
           f"max {max(w):.4f}", rank=rank)
    return w


def _difficulty_problems(train_src: list[Source], train_recs: list[list]) -> list[str]:
    problems = []
    for s, recs in zip(train_src, train_recs):
        bad = [(i, r) for i, r in enumerate(recs, 1) if _difficulty_of(r) is None]
        if bad:
            shown = ", ".join(f"record {i} (id {r.id!r}): "
                              + (f"meta is {type(r.meta).__name__}" if not isinstance(r.meta, dict)
                                 else f"meta.difficulty is {str(r.meta.get('difficulty'))[:40]}")
                              for i, r in bad[:3])
            problems.append(f"{s.where()}: --curriculum difficulty needs a finite number in meta.difficulty; "
                            f"{len(bad)} records have none ({shown})")
    return problems


def _difficulty(cfg: Config, train_ex: list, source_of: list[int], train_recs: list[list]) -> list[float] | None:
    """Curriculum difficulty of every training example (None without a curriculum)."""
    if cfg.data.curriculum == "difficulty":
        by_id = [{r.id: _difficulty_of(r) for r in recs} for recs in train_recs]
        return [by_id[s][e.id] for e, s in zip(train_ex, source_of)]
    if cfg.data.curriculum == "steps":
        return [float(e.n_steps) for e in train_ex]
    if cfg.data.curriculum == "length":
        return [float(len(e.input_ids)) for e in train_ex]
    return None


def step_loss(cfg: Config, pos_fraction: float) -> StepLoss:
    """The inner loss of the run; balanced_ce takes --pos_fraction, or the one measured on the training data."""
    t = cfg.train
    pf = t.pos_fraction or pos_fraction
    if t.step_loss == "balanced_ce" and not 0 < pf < 1:
        raise DataError([f"--step_loss balanced_ce: the training step labels have positive fraction {pf} (one "
                         "class only); class balance needs both, or set --pos_fraction"])
    return StepLoss(t.step_loss, t.hard_labels, t.focal_gamma, pf if 0 < pf < 1 else 0.5)


def train_stream(cfg: Config, data: RunData, pad_id: int, rank: int, world: int, wmod=None):
    """BatchStream over all sources (--mix size without curriculum: each example once per epoch, so sources are
    drawn in proportion to their size), else a MixtureStream."""
    d = cfg.data
    if d.mix == "size" and d.curriculum == "none":
        return with_workers(BatchStream(data.train_ex, cfg.train.batch_size, pad_id, rank, world, cfg.train.seed,
                                        collate_fn=collate_fn(cfg)), d.num_workers)
    curriculum = None
    if d.curriculum != "none":
        ramp = (d.curriculum_steps or cfg.train.total_steps) * cfg.train.grad_accum
        curriculum = Curriculum(d.curriculum_start, ramp, d.curriculum_schedule)
    stream = MixtureStream(data.train_ex, data.source_of, cfg.train.batch_size, pad_id,
                           source_probs(cfg, data, wmod), rank, world, cfg.train.seed, curriculum, data.difficulty,
                           collate_fn(cfg))
    return with_workers(stream, d.num_workers)


def meta_stream(cfg: Config, data: RunData, pad_id: int, rank: int, world: int) -> BatchStream:
    return BatchStream(data.meta_ex, cfg.meta.meta_batch_size, pad_id, rank, world, cfg.train.seed + 1,
                       collate_fn=collate_fn(cfg))


def source_probs(cfg: Config, data: RunData, wmod=None):
    """Sampling probability of every training source now (learned: from the domain table's weights)."""
    sizes = [data.source_of.count(k) for k in range(len(data.train_sources))]
    dw = None
    if cfg.data.mix == "learned" and wmod is not None:
        w = wmod.row_weights()
        dw = [float(w[data.domains.index(s.domain)]) for s in data.train_sources]
    return mixture_probs(sizes, cfg.data.mix, cfg.data.mix_alpha, [s.weight for s in data.train_sources], dw)


def collate_fn(cfg: Config):
    """Padded batches, or with --packing data.packing.collate_packed: rows as long as the batch's longest
    example for sdpa/eager (block-diagonal mask from the restarting position ids), one unpadded row for
    flash_attention_2 (its varlen path needs batch size 1). The batch order and the stream state are
    the same either way, so a packed run resumes like a padded one."""
    if not cfg.data.packing:
        return collate
    attn = resolve_attn(cfg.model.attn_implementation)
    check_attention(attn)
    return partial(collate_packed, one_row=attn == "flash_attention_2")
