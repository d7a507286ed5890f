"""The training loop: fit(cfg) sets up a run, train_loop runs it.

    fit:         process group -> run guard (lock, signals, status.json) -> resume decision (resume.py)
                 -> build: the data (data/sources.py), the engine (PRM + DeepSpeed), the weight module,
                    one TrainState (state.py) -> restore the checkpoint into them -> train_loop
    train_loop:  per update: fused pre-step, inner update, meta update when due, metrics (runlog.py),
                 evaluation when due, checkpoint when due or stopping (SIGTERM / Ctrl+C)
                 -> the end: instance weights, summary

The bilevel step itself (meta gradient, alignments, weight step) is dreamprm/bilevel.py; DeepSpeed is
behind dreamprm/engine.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamprm import bilevel, dist, engine, resume
from dreamprm import checkpoint as ckpt
from dreamprm.config import CHECKPOINTS_DIR, Config
from dreamprm.data import sources
from dreamprm.data.sources import RunData
from dreamprm.model import training_tokenizer
from dreamprm.runguard import RunGuard
from dreamprm.runlog import RunLog, dump_instance_weights, print0, truncate_metrics
from dreamprm.state import TrainState
from dreamprm.train_eval import eval_step_metrics, load_eval_examples
from dreamprm.weights import FixedWeights, build_weight_module, build_weight_optimizer


@dataclass
class Run:
    """What one process of a run works with: fixed once the run is set up; its changing state is `state`."""
    cfg: Config
    rank: int
    world: int
    eng: object  # engine.Engine
    data: RunData
    state: TrainState
    eval_ex: list
    resumed_from: Path | None
    base: dict | None = None  # the base folder's fingerprint when checkpoints leave the frozen base out

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def bilevel(self) -> bool:
        return self.cfg.meta.bilevel


def fit(cfg: Config, notes=()) -> int:
    rank, world = engine.init_distributed(cfg.run.collective_timeout)
    code = _fit(cfg, rank, world, notes)
    # The groups are destroyed when the interpreter exits, before its teardown (left to the teardown, gloo's
    # threads can abort a rank that has finished), not now: ZeRO-3 cannot build a second engine on re-created
    # groups in the same process. On a clean end only: NCCL's teardown can wait on a peer inside a collective.
    atexit.register(engine.close_distributed)
    return code


def _fit(cfg: Config, rank: int, world: int, notes) -> int:
    for n in notes:
        print0(n, rank=rank)
    torch.manual_seed(cfg.train.seed)
    if cfg.run.debug:
        torch.autograd.set_detect_anomaly(True)
    with RunGuard(cfg, rank) as guard:
        if guard.finished:  # nothing to train: status.json, metrics and wandb are left as they are
            print0(guard.finished, rank=rank)
            return 0
        base = resume.base_fingerprint(cfg, rank, world)  # None: the checkpoints hold the whole model
        resumed_from, universal = resume.choose(cfg, rank, world, base)
        run = build(cfg, rank, world, resumed_from, load_universal=universal is not None, base=base)
        guard.status["total_steps"] = cfg.train.total_steps  # resolved by now when --epochs gave it
        if cfg.run.dry_run:
            print0("dry run: config, data and model are valid; exiting before training", rank=rank)
            return 0
        if resumed_from is not None:
            resume.restore(run.eng, run.state, resumed_from, universal, rank, world)
        return train_loop(run, guard)


def build(cfg: Config, rank: int, world: int, resumed_from: Path | None, load_universal: bool,
          base: dict | None = None) -> Run:
    """The data, the engine, the weight module and a fresh TrainState (resume.restore fills it).
    base: resume.base_fingerprint's, recorded in every checkpoint (which then holds no frozen weights)."""
    bilevel_run = cfg.meta.bilevel
    records = sources.read_run_records(cfg, needs_meta=bilevel_run)  # every source's problems, before any model
    tokenizer = training_tokenizer(cfg.model)
    data = sources.run_data(cfg, tokenizer, rank, needs_meta=bilevel_run, world=world, records=records)
    if resumed_from is not None:  # data of another size: refused here, not when the streams are restored
        resume.check_data(data, resumed_from)
    if cfg.train.epochs:  # before anything reads total_steps (schedule, curriculum, streams)
        for note in resume.resolve_epochs(cfg, len(data.train_ex), world, resumed_from):
            print0(note, rank=rank)
    fixed = sources.transferred(cfg, data, records[0], rank) if cfg.meta.weights_from else None  # before the model
    eng = engine.create_engine(cfg, rank, world, sources.step_loss(cfg, data.pos_fraction), tokenizer=tokenizer,
                               load_universal=load_universal)
    eval_ex = []
    if cfg.run.eval_every:
        eval_ex, se = load_eval_examples(cfg, tokenizer, data.domains)
        print0(f"eval  {cfg.data.eval_file}: {se}", rank=rank)
    wmod = FixedWeights(fixed) if fixed is not None else build_weight_module(
        cfg.meta.weights, [ex.domain for ex in data.train_ex], len(data.domains), cfg.meta.net_hidden)
    wopt = build_weight_optimizer(wmod, cfg.meta, cfg.train.batch_size * cfg.train.grad_accum * world)
    pad_id = tokenizer.pad_token_id
    state = TrainState.new(wmod, wopt, sources.train_stream(cfg, data, pad_id, rank, world, wmod),
                           sources.meta_stream(cfg, data, pad_id, rank, world) if bilevel_run else None,
                           data.source_of, len(data.train_sources))
    n_train = sum(p.numel() if eng.stage != 3 else p.ds_numel for p in eng.params)
    print0(f"ranks {world}, ZeRO stage {eng.stage}, {cfg.train.precision}, mode {cfg.model.mode}: "
           f"{n_train:,} trainable parameters; weights "
           f"{cfg.meta.weights if bilevel_run else 'uniform (baseline)' if fixed is None else 'fixed (transferred)'}"
           f"{', hypergradient ' + cfg.meta.hypergrad if bilevel_run else ''}", rank=rank)
    return Run(cfg, rank, world, eng, data, state, eval_ex, resumed_from, base)


def train_loop(run: Run, guard: RunGuard) -> int:
    cfg, st = run.cfg, run.state
    if not open_run_dir(run, guard):
        return guard.exit_code()
    log = RunLog(cfg, run.run_dir, run.rank, [s.name for s in run.data.train_sources], st.step, guard.status,
                 guard.write)
    fused = run.bilevel and cfg.meta.hypergrad == "fused"
    uniform = cfg.meta.baseline or cfg.data.mix == "learned"  # learned mix: the weights sample, the loss is 1
    try:
        for step in range(st.step + 1, cfg.train.total_steps + 1):
            guard.status["step"] = step
            meta_due = run.bilevel and step > cfg.meta.meta_warmup and step % cfg.meta.meta_interval == 0
            # fused pre-step: v on a meta batch before the update, whose own backward then takes the alignments
            pre = bilevel.fused_meta_gradient(run.eng, next(st.meta_stream), cfg) if meta_due and fused else None
            # inner update
            out = engine.inner_update(run.eng, st.train_stream, st.wmod, uniform, step,
                                      tap=pre["tap"] if pre else None)
            st.step = step
            st.observe(out["recent"], log.src_window)
            # meta update when due
            meta = meta_update(run, out["recent"], pre) if meta_due else None
            pre = None  # v's shards are not needed after the weight step
            log.update(out, meta)
            # evaluation when due: every rank takes part; its metrics get a row of their own
            evals = run_eval(run) if run.eval_ex and step % cfg.run.eval_every == 0 else {}
            # metrics
            if log.due(step) or evals:
                log.row(step, run.eng.lr(), st, st.train_stream, evals)
            log.tick(out, step)
            # checkpoint when due or stopping
            stopping = guard.stop_requested()
            if step % cfg.run.save_every == 0 or step == cfg.train.total_steps or stopping:
                save(run, guard)
            if stopping:
                log.close_bar()
                print0(f"stopped by signal at update {step}; checkpoint {guard.status['last_checkpoint']}. "
                       "Run the same command again to resume.", rank=run.rank)
                guard.status["state"] = "stopped"
                return guard.exit_code()
        guard.status["state"] = "finished"  # instance_weights.jsonl: written with the last checkpoint
        log.summary(st.source_totals(), st.train_stream, st.step)
        return 0
    finally:
        log.close()


def open_run_dir(run: Run, guard: RunGuard) -> bool:
    """config.yaml written, metrics past the checkpoint dropped; False if a signal came during start-up."""
    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(run.run_dir / "config.yaml", run.cfg.to_yaml())
        note = truncate_metrics(run.run_dir / "metrics.jsonl", run.state.step)
        if note:
            print0(note)
    dist.barrier()
    last = str(run.resumed_from) if run.resumed_from is not None else None
    if guard.stop_requested():
        guard.status.update(state="stopped", step=run.state.step, last_checkpoint=last)
        print0(f"stopped by signal during startup at update {run.state.step}", rank=run.rank)
        return False
    guard.status.update(state="running", step=run.state.step, last_checkpoint=last)
    guard.write()  # not only at the first metrics row: a job between two rows is running, not starting
    return True


def meta_update(run: Run, recent: list, pre: dict | None) -> dict:
    """The weight module's step from the meta set (pre: the fused pre-step's v; else v is taken now)."""
    st = run.state
    meta = bilevel.meta_update(run.eng, None if pre else next(st.meta_stream), recent, st.wmod, st.wopt, run.cfg,
                               st.step, fused=pre)
    if run.cfg.data.mix == "learned":  # the next batches are drawn with the updated domain weights
        st.train_stream.set_probs(sources.source_probs(run.cfg, run.data, st.wmod))
    return meta


def run_eval(run: Run) -> dict:
    """eval_* metrics on --eval_file (all ranks take part); dropout off, the train mode restored after."""
    module = run.eng.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return eval_step_metrics(lambda b: run.eng.forward(b, meta=True), run.eval_ex,
                                     run.cfg.train.batch_size, run.rank, run.world,
                                     run.eng.tokenizer.pad_token_id)
    finally:
        module.train(was_training)


def save(run: Run, guard: RunGuard) -> Path:
    """A checkpoint of the engine and the whole TrainState (a collective). With a base fingerprint the
    frozen base is left out and the fingerprint recorded (shared["base"]), for resume, export and scoring."""
    shared, per_rank = run.state.state_dict()
    shared.update(config=run.cfg.to_dict(),
                  profiles={n: dataclasses.asdict(p) for n, p in run.data.profiles.items()})
    if run.base is not None:
        shared["base"] = run.base
    path, notes = engine.save_checkpoint(
        run.eng, run.run_dir / CHECKPOINTS_DIR, run.state.step, shared=shared, per_rank=per_rank,
        keep_last=run.cfg.run.keep_last, parent=Path(guard.status["last_checkpoint"] or "").name or None,
        keep=[run.resumed_from] if run.resumed_from is not None else [], exclude_frozen=run.base is not None)
    for n in notes:  # old checkpoints that could not be deleted: the run goes on, the disk fills
        print(f"dreamprm: warning: {n}", file=sys.stderr, flush=True)
    guard.status["last_checkpoint"] = str(path)
    guard.write()  # before the weights: a reader takes the checkpoint status.json names as the run's own
    # the weights as of this checkpoint, so that `dreamprm weights` reads a running or stopped run too
    dump_instance_weights(run.state.wmod, run.data.train_ex, run.state.last_w, run.run_dir, run.rank,
                          run.cfg.meta.baseline, run.data.domains, path)
    return path
