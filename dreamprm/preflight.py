"""Pre-flight: everything a run needs that lies outside its config, checked before anything heavy starts.

    cfg, problems, notes = config.parse_config(argv)
    notes += preflight.check(cfg, problems)    # ConfigError listing the config's and these problems

The files the config names (data sources, --eval_file, --deepspeed, the model and --resume_from
folders), the records of the data when anything else is wrong (so that one run reports everything),
the machine (a GPU, bitsandbytes), the DeepSpeed JSON against the world size, --resume_step against
the checkpoint folder, and on request the run directory's lock. Then the one length rule: max_length
is capped at the model's limit. launch/train.py (dreamprm.cli.train) and slurm/preflight.py call it;
torch is imported only to ask whether a GPU is visible, and with deepspeed (dreamprm.engine.core) to have
DeepSpeed check a --deepspeed JSON's fields once everything else passed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from dreamprm.config import MODEL_FLAG, Config, parse_sources
from dreamprm.data.learned import read_learned, stale_problem
from dreamprm.data.mixing import read_sources
from dreamprm.data.readers import file_problem, read_json
from dreamprm.errors import ConfigError, RunLockError, WeightsError
from dreamprm.tiny import TINY_MAX_POSITIONS


def check(cfg: Config, problems=(), world: int | None = None, check_machine: bool = True,
          check_lock: bool = False) -> list[str]:
    """Notes to print; raises ConfigError listing problems (the config's own, from parse_config) and every
    problem found here at once. Resolves --resume_step into cfg.run.resume_from and caps cfg.data.max_length.

    world: ranks of the job (None: WORLD_SIZE of the environment, as a launcher sets it). check_machine: what
    this machine lacks (off where the checking process may not see the job's GPUs). check_lock: the run
    directory's LOCK (the trainer takes it itself; slurm/preflight.py asks before any rank starts)."""
    p = machine_problems(cfg) if check_machine else []
    if cfg.run.resume_step:
        from dreamprm.resume import apply_resume_step  # deepspeed (resume reads checkpoints through the engine)

        p += apply_resume_step(cfg)
    p += list(problems)
    p += path_problems(cfg, world)
    if not p and cfg.train.deepspeed:  # DeepSpeed's own checks of every field, once the config and ours pass
        from dreamprm.engine.core import ds_config, ds_config_problems  # torch, deepspeed: only for a --deepspeed run

        p += ds_config_problems(ds_config(cfg, 1), cfg.train.deepspeed)
    if p and cfg.data.train_file:  # the data's problems too, so that one run reports everything
        p += data_problems(cfg)
    notes = []
    if check_lock:
        from dreamprm import runguard  # torch (its collectives): not for `--help` and config errors

        try:
            note = runguard.check(Path(cfg.run.output_dir))
            notes += [note] if note else []
        except RunLockError as e:
            p.append(str(e))
    if p:
        raise ConfigError(p)
    capped = effective_max_length(cfg)
    return notes + ([capped] if capped else [])


def path_problems(cfg: Config, world: int | None = None) -> list[str]:
    """The files and folders the config names: missing ones, and a DeepSpeed JSON that contradicts it
    on `world` ranks (None: WORLD_SIZE of the environment)."""
    d, t, r, p = cfg.data, cfg.train, cfg.run, []
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    sources = (parse_sources(d.train_file, "--train_file", d.train_format)[0]
               + parse_sources(d.meta_file, "--meta_file", d.meta_format)[0])
    files = [("--eval_file", d.eval_file), ("--deepspeed", t.deepspeed), *((s.flag, s.path) for s in sources)]
    p += [f"{flag}: {bad}" for flag, path in files if path and (bad := file_problem(path))]  # a FIFO is not opened
    if cfg.model.name_or_path and not Path(cfg.model.name_or_path).is_dir():
        p.append(f"{MODEL_FLAG}: {cfg.model.name_or_path} is not a local folder (dreamprm never downloads: "
                 "put a HF checkpoint there, e.g. with `huggingface-cli download`)")
    out = Path(r.output_dir)
    blocker = next((q for q in (out, *out.parents) if q.exists()), None)
    if r.output_dir.strip() and blocker is not None and not blocker.is_dir():
        inside = "" if blocker == out else f" (on the way to {out})"
        p.append(f"--output_dir: {blocker} is a file, not a folder{inside}; pass the run directory (it is created "
                 "if missing)")
    if r.resume_from not in ("auto", "none") and not Path(r.resume_from).is_dir():
        p.append(f"--resume_from: {r.resume_from} is not a checkpoint folder (or use auto / none)")
    if t.deepspeed and not file_problem(t.deepspeed):
        p += check_ds_json(cfg, Path(t.deepspeed), world)
    if cfg.meta.weights_from:
        p += weights_from_problems(cfg)
    return p


def weights_from_problems(cfg: Config) -> list[str]:
    """--weights_from: a run directory (or its instance_weights.jsonl) with learned weights that can be read; that
    they fit this run's data is checked once the records are read (data.sources.record_weights)."""
    try:
        stale = read_learned(cfg.meta.weights_from, "--weights_from", allow_file=True).stale()
    except WeightsError as e:
        return [str(e)]
    return [stale_problem(f"--weights_from {cfg.meta.weights_from}", stale)] if stale else []


def data_problems(cfg: Config) -> list[str]:
    """The records' problems (read_sources) of the config's sources whose files exist."""
    d = cfg.data
    train = [s for s in parse_sources(d.train_file, "--train_file", d.train_format)[0] if Path(s.path).is_file()]
    meta = [s for s in parse_sources(d.meta_file, "--meta_file", d.meta_format)[0] if Path(s.path).is_file()]
    return read_sources(train, meta if cfg.meta.bilevel else [], cfg.model.step_tag, d.skip_invalid)[2]


def machine_problems(cfg: Config) -> list[str]:
    """What this machine lacks for the config: QLoRA needs bitsandbytes and a CUDA GPU,
    --device cuda a GPU. torch is imported only to answer those questions."""
    m, t, p = cfg.model, cfg.train, []
    gpu = None
    if t.device == "cuda" or (m.mode == "qlora" and t.device == "auto"):
        import torch

        gpu = torch.cuda.is_available()
    if t.device == "cuda" and not gpu:
        p.append("--device cuda: no CUDA GPU is visible to torch here; use --device auto or cpu")
    if m.mode == "qlora":
        lacks = (["bitsandbytes is not installed"] if importlib.util.find_spec("bitsandbytes") is None else []) + \
                (["no CUDA GPU is visible"] if t.device == "auto" and gpu is False else [])
        if lacks:
            p.append("--mode qlora needs a CUDA GPU and bitsandbytes (pip install 'dreamprm[qlora]'); here "
                     + " and ".join(lacks) + ". Use --mode lora (the same adapters on a full-precision base)"
                     + (", or --device cpu to run bitsandbytes' CPU kernels anyway (slow; meant for tests)"
                        if gpu is False else ""))
    return p


# DeepSpeed JSON keys that the run config owns, with where the config's value comes from; a JSON that sets
# them differently is an error.
_DS_OWNED = {
    "train_micro_batch_size_per_gpu": (lambda c, w: c.train.batch_size, lambda c, w: "--batch_size"),
    "gradient_accumulation_steps": (lambda c, w: c.train.grad_accum, lambda c, w: "--grad_accum"),
    "train_batch_size": (lambda c, w: c.train.batch_size * c.train.grad_accum * w,
                         lambda c, w: f"batch_size={c.train.batch_size} x grad_accum={c.train.grad_accum} x world={w}"),
    "gradient_clipping": (lambda c, w: c.train.grad_clip, lambda c, w: "--grad_clip"),
}


# DeepSpeed JSON blocks that must be objects, with an example of each for the message.
_DS_OBJECTS = {"zero_optimization": '{"stage": 3}', "bf16": '{"enabled": "auto"}', "fp16": '{"enabled": false}',
               "activation_checkpointing": "{}", "checkpoint": "{}", "comms_logger": "{}", "flops_profiler": "{}"}


def check_ds_json(cfg: Config, path: Path, world: int) -> list[str]:
    """The DeepSpeed JSON's settings that contradict the run config on `world` ranks."""
    ds, bad = read_json(path)
    if bad:
        return [f"--deepspeed: {bad}"]
    if not isinstance(ds, dict):
        return [f"--deepspeed: {path}: the top level is a {type(ds).__name__}; a DeepSpeed config is a JSON object "
                "({\"zero_optimization\": {\"stage\": 3}, ...})"]
    p = [f"--deepspeed: {path}: \"{key}\" is {json.dumps(ds[key])}; it must be an object (e.g. \"{key}\": "
         f"{example})" for key, example in _DS_OBJECTS.items() if key in ds and not isinstance(ds[key], dict)]
    if p:
        return p
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        return [f"--deepspeed: {path}: zero_optimization.stage is {json.dumps(stage)}; it must be 0, 1, 2 or 3"]
    for key, (want, origin) in _DS_OWNED.items():
        if key in ds and ds[key] != "auto" and ds[key] != want(cfg, world):
            p.append(f"--deepspeed: {path} sets {key}={ds[key]} but the run config gives {want(cfg, world)} "
                     f"({origin(cfg, world)}); remove {key} from the JSON or set it to \"auto\"")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            p.append(f"--deepspeed: {path} has an {key!r} block; dreamprm builds the optimizer and "
                     "schedule from --lr/--lr_schedule: remove it")
    for key, flag in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = ds.get(key, {}).get("enabled")
        if enabled not in (None, "auto") and enabled != (cfg.train.precision == flag):
            p.append(f"--deepspeed: {path} sets {key}.enabled={enabled} but --precision is "
                     f"{cfg.train.precision}; set it to \"auto\" or remove it")
    if cfg.model.mode == "qlora" and stage == 3:
        p.append("--mode qlora cannot run under ZeRO-3 (4-bit weights are not partitioned: "
                 "bitsandbytes/peft known issue); use ds_configs/zero2.json or one GPU without --deepspeed")
    return p


LENGTH_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def model_length_limit(hf_config: dict) -> int | None:
    """The longest input a model takes, from its config.json fields; None if it names none."""
    return next((int(hf_config[k]) for k in LENGTH_LIMIT_KEYS if isinstance(hf_config.get(k), int)), None)


def effective_max_length(cfg: Config) -> str | None:
    """The one length rule: max_length = min(--max_length, the model's limit). Applied to the
    config here, before anything uses it, so training, --eval_file, the saved config, the
    checkpoint and the export all carry the same value; returns the note to print, if capped."""
    path = cfg.model.name_or_path
    if path:
        try:
            limit = model_length_limit(json.loads((Path(path) / "config.json").read_text()))
        except (OSError, ValueError):
            return None  # a missing or broken model folder is reported when it is loaded
        where = f"{Path(path) / 'config.json'}"
    else:
        limit, where = TINY_MAX_POSITIONS, "the built-in tiny model"
    if limit is None or cfg.data.max_length <= limit:
        return None
    note = (f"max_length: --max_length {cfg.data.max_length} is more than the model takes "
            f"({limit} positions, {where}); using {limit} for training, evaluation and export")
    cfg.data.max_length = limit
    return note
