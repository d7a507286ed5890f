"""The DeepSpeed engine around the PRM, and the inner update.

create_engine builds the PRM, its AdamW and LR schedule inside deepspeed.initialize; Engine
wraps the result with the accessors the bilevel step needs (module, params, forward,
meta_backward, local_grad, local_tensor, params_changed, zero_grad), so that bilevel.py never
touches DeepSpeed. inner_update: grad_accum micro-batches of the weighted loss, then the
engine's own step (with a bilevel.FusedTap under --hypergrad fused).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's own pick here, without its "no GPU detected" warning
import deepspeed  # the one module of dreamprm that imports deepspeed (checkpoint_io takes what it needs here)
import pydantic
from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
from deepspeed.utils import safe_get_local_grad
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: F401 (checkpoint_io)

from dreamprm import bilevel, dist, hypergrad
from dreamprm.config import Config, RunConfig
from dreamprm.data.readers import read_json
from dreamprm.errors import ConfigError
from dreamprm.model import build_prm

# DeepSpeed's ZeRO collectives call the torch.distributed names that torch 2.13 deprecated in
# favour of *_single; they still work, and the warning repeats on every rank and update.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                        "is deprecated", category=FutureWarning)


# ---------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = RunConfig.collective_timeout) -> tuple[int, int]:
    """Join (or, for a plain `python` run, create) the process group; returns rank, world.

    timeout_s: how long a collective waits for the other ranks (torch's default, 30 min, is
    long for a lost node); every group, DeepSpeed's own included, gets it."""
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    # The shm op is never used for training and costs a 20-50 s compile on a cold cache.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dist.set_collective_timeout(timeout_s)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False, timeout=timedelta(seconds=timeout_s))
    dist.make_monitor_group(timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.rank_world()


def close_distributed() -> None:
    """Destroy every process group at the clean end of a process (fit registers it with atexit); a no-op
    without one.

    Left to the interpreter's teardown, gloo's worker threads can outlive it and abort a rank (SIGABRT,
    "terminate called without an active exception") after the run has finished. Call it on success only:
    NCCL's teardown can wait on a peer that is still inside a collective."""
    if torch.distributed.is_initialized():
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so a later run can re-init
    dist.forget_groups()


# ---------------------------------------------------------------- engine


def ds_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON (engine settings) completed with the batch fields of the run config."""
    ds = {}
    if cfg.train.deepspeed:  # pre-flight read it the same way; a file edited since is refused, not half-read
        ds, bad = read_json(cfg.train.deepspeed)
        if bad or not isinstance(ds, dict):
            raise ConfigError([f"--deepspeed: {bad or f'{cfg.train.deepspeed}: not a JSON object'}"])
    t = cfg.train
    ds.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
              train_batch_size=t.batch_size * t.grad_accum * world, gradient_clipping=t.grad_clip)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("zero_optimization", {"stage": 0})
    ds["zero_allow_untested_optimizer"] = True  # a client torch AdamW: no FusedAdam JIT compile
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def ds_config_problems(dsc: dict, path: str) -> list[str]:
    """What DeepSpeed's own config model refuses in dsc (a ds_config): a field of the wrong type, an unknown key, a
    value outside its choices, one line each naming --deepspeed, the file and the field. It builds the DeepSpeedConfig
    that deepspeed.initialize would, needing no process group, so pre-flight asks it before the model is built.
    train_batch_size is left for DeepSpeed to derive (pre-flight checks the JSON's own against the world size)."""
    try:
        DeepSpeedConfig({k: v for k, v in dsc.items() if k != "train_batch_size"})
    except pydantic.ValidationError as e:
        return [f"--deepspeed: {path}: {_ds_field(dsc, err['loc'], err['input'], e.title)}: {err['msg']}"
                + ("" if err["type"] == "missing" else f" (got {json.dumps(err['input'], default=str)[:80]})")
                for err in e.errors()]
    except (DeepSpeedConfigError, AssertionError, TypeError, ValueError, KeyError) as e:
        # DeepSpeedConfig only reads the dict, so whatever its own checks raise the JSON caused ("enabled": "maybe"
        # of flops_profiler is a TypeError inside it, an unknown checkpoint.tag_validation a DeepSpeedConfigError)
        return [f"--deepspeed: {path}: DeepSpeed refuses it: {str(e) or type(e).__name__}"]
    return []


def _ds_field(dsc: dict, loc: tuple, value, model: str) -> str:
    """The dotted path in dsc of a pydantic error's loc, which DeepSpeed gives inside the block it validated
    (zero_optimization.reduce_bucket_size is just ('reduce_bucket_size',)): every path ending in loc that holds
    value; loc itself, with DeepSpeed's model name, where none does."""
    loc, found, todo = tuple(map(str, loc)), [], [((), dsc)]
    while todo and loc:
        where, d = todo.pop()
        for k, v in d.items():
            path = (*where, str(k))
            if path[-len(loc):] == loc and v == value:
                found.append(".".join(path))
            if isinstance(v, dict):
                todo.append((path, v))
    return " or ".join(sorted(found)) or f"{'.'.join(loc) or 'a block'} (of DeepSpeed's {model})"


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class Engine:
    """A DeepSpeed engine and what the trainer and the bilevel step read from it."""

    ds: object  # deepspeed.DeepSpeedEngine
    stage: int
    rank: int
    world: int
    tokenizer: object
    # the inner loss; the inner update and both alignment methods use it, so the hypergradient is its own
    step_loss: hypergrad.StepLoss
    params: list = field(default_factory=list)  # trainable parameters, in a fixed order
    hf_ds_config: object = None  # keeps zero.Init partitioning active for ZeRO-3 loads

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def sharded(self) -> bool:
        """ZeRO-3: each rank holds a shard of every parameter (p.ds_tensor), not the parameter."""
        return self.stage == 3

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.ds.device)

    def forward(self, batch: dict, meta: bool = False) -> torch.Tensor:
        """The PRM's step logits [N, K, 2], padded or packed batch (data.packing: position_ids, no mask).

        Meta passes call the module itself: the engine's forward hooks its outputs for engine.backward,
        which forbids the autograd.grad the meta pass uses; ZeRO-3's parameter gathering hooks sit on
        the submodules and still run."""
        b = self.to_device(batch)
        fn = self.ds.module if meta else self.ds
        if b.get("position_ids") is not None:
            return fn(b["input_ids"], None, b["tag_pos"], b["position_ids"])
        return fn(b["input_ids"], b["attention_mask"], b["tag_pos"])

    def meta_backward(self, loss: torch.Tensor) -> None:
        """ZeRO-3's own backward of a meta loss (reduce-scatters into the gradient partitions), unscaled
        by grad_accum; read the result with local_grad, clear it with zero_grad."""
        self.ds.backward(loss, scale_wrt_gas=False)

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """This rank's gradient shard of p after meta_backward (ZeRO-3)."""
        return safe_get_local_grad(p)

    def local_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the forward reads for p on this rank (its shard under ZeRO-3)."""
        return p.ds_tensor.data if self.sharded else p.data

    def params_changed(self) -> None:
        """After writing local_tensor: ZeRO-3 would otherwise reuse the parameters gathered by the last forward."""
        if self.sharded:
            self.ds.optimizer.empty_partition_cache()

    def zero_grad(self) -> None:
        """Clear what a meta pass left in the optimizer's gradient buffers (autograd.grad or meta_backward)."""
        self.ds.optimizer.zero_grad()

    def lr(self) -> float:
        """The PRM's learning rate now (the scheduler's, inside DeepSpeed)."""
        return self.ds.get_lr()[0]


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        frac = (step - t.warmup_steps) / max(1, t.total_steps - t.warmup_steps)
        if t.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1 + math.cos(math.pi * frac))  # cosine
    return f


def create_engine(cfg: Config, rank: int, world: int, step_loss: hypergrad.StepLoss, tokenizer=None,
                  model=None, load_universal: bool = False) -> Engine:
    """The DeepSpeed engine around the PRM.

    step_loss: the inner loss (data.sources.step_loss, measured on the data). tokenizer: the one
    model.training_tokenizer(cfg.model) gives, loaded before the engine to read the data; None: loaded
    here. model: a PRM built elsewhere (bench/gpu.py's random 7B, via model.prepare_for_training), with its
    tokenizer; default: build_prm(cfg.model). load_universal: the run resumes from a DeepSpeed universal
    checkpoint (one of another world size, see checkpoint_io.universal_copy)."""
    if model is not None and tokenizer is None:
        raise ValueError("create_engine: a PRM built elsewhere (model=...) needs its tokenizer (tokenizer=...)")
    dsc = ds_config(cfg, world)
    if load_universal:
        dsc["checkpoint"] = {**dsc.get("checkpoint", {}), "load_universal": True}
    if problems := ds_config_problems(dsc, cfg.train.deepspeed):  # before HfDeepSpeedConfig and initialize read it
        raise ConfigError(problems)
    stage = dsc["zero_optimization"].get("stage", 0)
    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(dsc)  # must stay alive while the model is built
    torch.manual_seed(cfg.train.seed)  # head and LoRA init come from the global RNG
    if model is not None:
        prm = model
    else:
        prm, tokenizer = build_prm(cfg.model, cfg.train.precision, tokenizer=tokenizer)
    params = [p for p in prm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds, _, _, _ = deepspeed.initialize(model=prm, optimizer=opt, lr_scheduler=sched, config=dsc,
                                       model_parameters=params)
    eng = Engine(ds=ds, stage=stage, rank=rank, world=world, tokenizer=tokenizer, step_loss=step_loss,
                 params=[p for p in ds.module.parameters() if p.requires_grad], hf_ds_config=hf_ds)
    if cfg.meta.hypergrad == "finite_diff" and not cfg.meta.baseline:
        check_finite_diff_dtype(eng, cfg)
    return eng


def check_finite_diff_dtype(eng: Engine, cfg: Config) -> None:
    """finite_diff perturbs the parameters the forward reads; DeepSpeed decides their dtype
    (ZeRO 0-2 in bf16 cast LoRA adapters to bf16 too). In bf16 most of a perturbation of
    fd_radius / ||v|| per element rounds away, so refuse it rather than return noise."""
    dtypes = {str(eng.local_tensor(p).dtype).replace("torch.", "") for p in eng.params}
    low = sorted(dtypes - {"float32", "float64"})
    if low:
        raise ConfigError([f"--hypergrad finite_diff: after DeepSpeed set up the engine (ZeRO stage {eng.stage}, "
                           f"--precision {cfg.train.precision}, --mode {cfg.model.mode}) the parameters it would "
                           f"perturb are {', '.join(low)}, which round most of the perturbation away; use "
                           "--hypergrad exact, or --precision fp32"])


# ---------------------------------------------------------------- inner update


def inner_update(eng: Engine, stream, wmod, uniform: bool, step: int, tap: bilevel.FusedTap | None = None) -> dict:
    """One PRM update: grad_accum weighted micro-batches (uniform: weights 1), then the engine's step.

    Returns logging sums and the micro-batches (with detached features) for the meta pass.
    A non-finite instance loss on any rank stops before backward, naming step and ids.
    tap (--hypergrad fused, from bilevel.fused_meta_gradient): the update's own backward also yields each
    instance's alignment a_i = <grad l_i, v> at the parameters before the update (recent[k]["align"]).
    """
    recent, sums = [], torch.zeros(4, dtype=torch.float64)  # loss*w, loss, n, tokens
    gas = eng.ds.gradient_accumulation_steps()
    batches = [eng.to_device(next(stream)) for _ in range(gas)]
    if tap is not None:
        tap.start(batches)
    with tap or contextlib.nullcontext():
        for k, batch in enumerate(batches):
            if tap is not None:
                tap.begin(batch)
            logits = eng.forward(batch)
            losses = hypergrad.instance_losses(logits, batch, eng.step_loss)
            bilevel.check_finite(losses, batch, f"inner loss at update {step}")
            feats = hypergrad.instance_features(logits, batch, losses)
            with torch.no_grad():
                w = torch.ones_like(losses) if uniform else wmod(batch["index"], batch["domain"], feats)
            loss = (w.to(losses.dtype) * losses).mean()
            eng.ds.backward(loss)
            r = {"batch": batch, "features": feats, "weights": w.detach(), "losses": losses.detach()}
            if tap is not None:  # the engine scales the loss by 1/gas: gradient = w_i / (B * gas) * grad l_i
                r["align"] = tap.result(k, w.detach().double() / (len(losses) * gas))
            eng.ds.step()
            recent.append(r)
            sums += torch.tensor([(w * losses).sum().item(), losses.sum().item(), len(losses),
                                  batch["n_tokens"]], dtype=torch.float64)
    if tap is not None:
        tap.finish(step)
    dist.all_reduce_(sums)
    return {"loss": sums[0].item() / sums[2].item(), "loss_unweighted": sums[1].item() / sums[2].item(),
            "instances": int(sums[2].item()), "tokens": int(sums[3].item()), "recent": recent}
