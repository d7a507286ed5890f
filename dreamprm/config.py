"""The one config tree: every option, its default and its help live here.

A run is configured by a YAML recipe (nested by section) plus command-line flags (flat:
every field name is unique across sections, so ``--lr`` needs no section prefix). The
flags of the original MiniF2F script are accepted as aliases with the same meaning.
Validation collects every problem before reporting, and names the flag of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_origin, get_type_hints

import yaml

from dreamprm.errors import ConfigError

DEMO_RECIPE = Path(__file__).parent / "demo" / "demo.yaml"

# Option lists and constants: their one home (model, metrics, hypergrad and data import them from here).
DEFAULT_STEP_TAG = "<extra_0>"  # Qwen2.5-Math-PRM's tag, assumed for PRM folders that do not record one
PRECISIONS = ("bf16", "fp32", "fp16")
MODES = ("full", "lora", "qlora")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
WEIGHTS = ("instance_domain_table", "instance_table", "instance_net", "domain_table")
METHODS = ("exact", "finite_diff", "fused")
TABLE_OPTIMIZERS = ("shared_rms", "row_adam", "sgd")
AGGREGATIONS = ("mean_logodds", "min", "prod", "mean", "last")
META_LOSSES = ("bce", "mse")
SCHEDULES = ("constant", "cosine", "linear")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DEVICES = ("auto", "cuda", "cpu")
MIXES = ("size", "temperature", "weights", "learned")
CURRICULA = ("none", "steps", "length", "difficulty")
CURRICULUM_SCHEDULES = ("linear", "sqrt")
STEP_LOSSES = ("ce", "balanced_ce", "focal")
PROFILE_NAMES = ("default", "plain", "problem_solution", "custom")  # data.tokenize.PROFILES + custom


def opt(default, help, choices=None, alias=(), sources=False):
    """A config field with its help text, allowed values and old-script flag aliases.

    sources: a data-source field (--train_file, --meta_file): the flag may be repeated and YAML
    may give a list; one value stays a plain string (data.mixing parses the specs)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "alias": tuple(alias), "sources": sources}, **kw)


@dataclass
class DataConfig:
    train_file: str = opt("", "training data (JSONL/JSON, any format `dreamprm data` reads); repeat the flag "
                          "(or give a YAML list) for several sources, each PATH[,name=N][,format=F][,domain=D]"
                          "[,weight=W][,profile=P]; empty with no --config = the bundled demo data",
                          alias=("--train_json_file",), sources=True)
    meta_file: str = opt("", "meta (held-out, outcome-labelled) data for the hypergradient; repeatable like "
                         "--train_file", alias=("--meta_json_file",), sources=True)
    eval_file: str = opt("", "optional held-out step-labelled file evaluated every eval_every steps")
    train_format: str = opt("auto", "format of train_file (see `dreamprm data convert --help`)")
    meta_format: str = opt("auto", "format of meta_file")
    eval_format: str = opt("auto", "format of eval_file")
    max_length: int = opt(4096, "tokens per example, capped at the model's max_position_embeddings; "
                          "longer solutions are cut at a step boundary")
    skip_invalid: bool = opt(False, "drop invalid records (reported by file:line) instead of failing")
    num_workers: int = opt(0, "DataLoader worker processes for batch collation")
    packing: bool = opt(False, "pack the examples of a micro-batch end to end in rows (less padding; no "
                        "attention across examples: sdpa/eager get a block-diagonal mask, flash_attention_2 "
                        "one varlen row); losses, weights and meta passes stay per example")
    mix: str = opt("size", "how training sources are sampled: size = proportional to size; temperature = "
                   "p ~ n^mix_alpha; weights = the sources' weight=; learned = the domain table's learned "
                   "weights (times n^mix_alpha) as sampling probabilities instead of loss weights", MIXES)
    mix_alpha: float = opt(0.5, "exponent of --mix temperature and learned (1 = by size, 0 = uniform over sources)")
    curriculum: str = opt("none", "easy-to-hard order within each source, by number of steps, tokens, or the "
                          "records' meta.difficulty field", CURRICULA)
    curriculum_start: float = opt(0.2, "share of each source (its easiest) sampled at update 0")
    curriculum_steps: int = opt(0, "updates until the whole of every source is sampled (0 = --total_steps)")
    curriculum_schedule: str = opt("linear", "growth of the sampled share: linear, or sqrt (fast first)",
                                   CURRICULUM_SCHEDULES)
    profile: str = opt("default", "prompt profile of sources without profile=: default = system prompt + chat "
                       "template (dreamprm's usual), plain = the question alone, problem_solution, custom",
                       PROFILE_NAMES)
    system_prompt: str = opt("", "system prompt of the custom profile (chat template only)")
    prompt_template: str = opt("{question}", "question template of the custom profile ({question} once)")


@dataclass
class ModelConfig:
    name_or_path: str = opt("", "local HF causal-LM or PRM folder; empty = a tiny Qwen2 built locally (demo, tests)",
                            alias=("--model_name",))
    step_tag: str = opt(DEFAULT_STEP_TAG, "step tag token placed after every step (one token of the tokenizer, "
                        "or added: see add_step_tag)")
    add_step_tag: bool = opt(True, "a step_tag that is not one token is added as a special token with a new "
                             "embedding row (mean of the others); off = such a tag is an error")
    mode: str = opt("lora", "what trains: full fine-tune, LoRA, or QLoRA (4-bit base, one GPU)", MODES)
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout (off during meta passes)")
    lora_targets: list = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                             "module names that get LoRA adapters")
    attn_implementation: str = opt("auto", "attention kernel; auto = flash_attention_2 if installed "
                                   "on a GPU, else sdpa", ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    gc_reentrant: bool = opt(False, "reentrant activation checkpointing (torch's older implementation); "
                             "the default non-reentrant one is faster with LoRA")
    trust_remote_code: bool = opt(False, "allow model code from the checkpoint folder")
    chat_template: bool = opt(True, "wrap the question in the tokenizer's chat template when it has one")


@dataclass
class TrainConfig:
    total_steps: int = opt(2000, "optimizer updates of the PRM")
    batch_size: int = opt(1, "training examples per rank per micro-batch")
    grad_accum: int = opt(1, "micro-batches per PRM update")
    lr: float = opt(2e-4, "PRM learning rate")
    weight_decay: float = opt(0.0, "PRM AdamW weight decay")
    lr_schedule: str = opt("constant", "PRM learning-rate schedule after warm-up", SCHEDULES)
    warmup_steps: int = opt(0, "linear warm-up updates")
    grad_clip: float = opt(1.0, "gradient-norm clipping of the PRM (0 = off)")
    precision: str = opt("bf16", "bf16 or fp32 (fp16 is not supported: its loss scaling breaks "
                         "meta gradients)", PRECISIONS)
    seed: int = opt(42, "random seed")
    device: str = opt("auto", "auto = the GPU(s) when visible, else the CPU; cuda = fail unless a GPU is "
                      "visible; cpu = train on the CPU even where GPUs are (hides them from torch)", DEVICES)
    step_loss: str = opt("ce", "per-step loss: ce (soft-label cross-entropy), balanced_ce (classes weighted to "
                         "half the loss each), focal", STEP_LOSSES)
    hard_labels: bool = opt(False, "round soft step labels to 0/1 (threshold 0.5) before the loss")
    focal_gamma: float = opt(2.0, "focal loss exponent")
    pos_fraction: float = opt(0.0, "balanced_ce: positive fraction of the step labels (0 = measured on the "
                              "training data)")
    deepspeed: str = opt("", "DeepSpeed JSON (engine settings only); empty = ZeRO stage 0 in-process")


@dataclass
class MetaConfig:
    baseline: bool = opt(False, "uniform weights, no meta pass (ablation)")
    weights: str = opt("instance_domain_table", "what the weight module weights: a row per instance times its "
                       "domain's factor (the instance table when there are no domains), a row per instance, an "
                       "MLP over per-instance features, or a row per domain", WEIGHTS)
    hypergrad: str = opt("exact", "alignment method: exact <grad l_i, v> after the update (per-sample hooks), "
                         "finite differences (DreamPRM; refused unless the perturbed parameters are fp32), or "
                         "fused: <grad l_i, v> before the update, taken inside the update's own backward", METHODS)
    meta_batch_size: int = opt(1, "meta examples per rank per meta pass")
    meta_lr: float = opt(0.1, "weight-module learning rate")
    table_optimizer: str = opt("shared_rms", "how table rows step: shared_rms = in proportion to their "
                               "alignment over one shared RMS; row_adam = lazy Adam per row (about meta_lr "
                               "* sign); sgd = meta_lr * gradient", TABLE_OPTIMIZERS)
    meta_interval: int = opt(1, "PRM updates between meta passes")
    meta_warmup: int = opt(0, "PRM updates with uniform weights (no meta pass) before the first meta pass")
    fd_radius: float = opt(0.01, "finite differences: eps = fd_radius / ||v||")
    aggregation: str = opt("mean_logodds", "step scores -> solution score for the meta loss", AGGREGATIONS)
    meta_loss: str = opt("bce", "meta loss on the solution score", META_LOSSES)
    net_hidden: int = opt(32, "hidden width of the instance_net weight module")


@dataclass
class RunConfig:
    output_dir: str = opt("runs/dreamprm", "run directory (config, metrics, checkpoints)",
                          alias=("--weights_path",))
    resume_from: str = opt("auto", "checkpoint folder to resume from; auto = output_dir's latest if "
                           "any; none = start fresh (fails if output_dir has checkpoints)")
    save_every: int = opt(500, "updates between checkpoints (a final one is always written)")
    keep_last: int = opt(3, "checkpoints kept (the newest of the run's lineage; the one resumed from is never "
                         "deleted)")
    collective_timeout: int = opt(600, "seconds a collective waits for a silent rank before the job stops, "
                                  "naming it (torch's default is 1800)")
    log_every: int = opt(10, "updates between metrics.jsonl lines")
    eval_every: int = opt(0, "updates between evaluations on eval_file (0 = off)")
    project_name: str = opt("dreamprm", "wandb project")
    experiment_name: str = opt("", "wandb run name (default: the output_dir name)")
    disable_wandb: bool = opt(False, "no wandb at all")
    wandb_mode: str = opt("auto", "auto = online with an API key, else offline", WANDB_MODES)
    dry_run: bool = opt(False, "validate config and data, build the model, then exit")
    debug: bool = opt(False, "log every update and run autograd anomaly detection (slow)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_types() -> dict:
    return get_type_hints(Config)


def _fields():
    """(section name, field, python type) for every option, in declaration order."""
    for name, cls in _section_types().items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield name, f, hints[f.name]


def _coerce(value, typ, where: str, problems: list[str], sources: bool = False):
    """Check a YAML value against the field type; ints are fine where floats are expected."""
    if sources and (isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(v, (str, dict)) for v in value))):
        return value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) else value
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is list or get_origin(typ) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif typ is str and isinstance(value, str):
        return value
    problems.append(f"{where}: {value!r} is not a {getattr(typ, '__name__', typ)}")
    return None


def _yaml_with_lines(path: Path):
    """Load YAML keeping the line of every top-level and section key for error messages."""
    text = path.read_text(encoding="utf-8")
    node = yaml.compose(text)
    data = yaml.safe_load(text) or {}
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[(k.value,)] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for k2, _ in v.value:
                    lines[(k.value, k2.value)] = k2.start_mark.line + 1
    return data, lines


def apply_yaml(cfg: Config, path: Path, problems: list[str]) -> None:
    try:
        data, lines = _yaml_with_lines(path)
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{path}: cannot read YAML: {e}")
        return
    if not isinstance(data, dict):
        problems.append(f"{path}: top level must be a mapping of sections ({', '.join(_sections())})")
        return
    for sec, body in data.items():
        where = f"{path}:{lines.get((sec,), '?')}"
        if sec not in _sections():
            problems.append(f"{where}: unknown section {sec!r} (sections: {', '.join(_sections())})")
            continue
        if not isinstance(body, dict):
            problems.append(f"{where}: section {sec!r} must be a mapping")
            continue
        obj = getattr(cfg, sec)
        hints = get_type_hints(type(obj))
        names = {f.name for f in dataclasses.fields(obj)}
        for key, value in body.items():
            kwhere = f"{path}:{lines.get((sec, key), '?')}"
            if key not in names:
                problems.append(f"{kwhere}: unknown option {sec}.{key} (see launch/train.py --help)")
                continue
            meta = next(f.metadata for f in dataclasses.fields(obj) if f.name == key)
            v = _coerce(value, hints[key], f"{kwhere}: {sec}.{key}", problems, meta["sources"])
            if v is not None:
                setattr(obj, key, v)


def _sections():
    return list(_section_types())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a process reward model with bilevel instance reweighting. "
                    "Options come from --config (YAML, nested by section) and these flags, "
                    "which override it. With neither --config nor --train_file the built-in "
                    "demo runs (tiny PRM, bundled data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    p.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher")
    p.add_argument("--resume_step", type=int, metavar="N",
                   help="resume from checkpoint step N of --output_dir (the MiniF2F script's flag; dreamprm "
                        "reads the step from the checkpoint, so --resume_from auto alone resumes the latest)")
    defaults = Config()
    for sec, cls in _section_types().items():
        g = p.add_argument_group(sec)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ, md = hints[f.name], f.metadata
            default = getattr(getattr(defaults, sec), f.name)
            names = [f"--{f.name}", *md["alias"]]
            kw = {"dest": f"{sec}.{f.name}", "metavar": f.name.upper(), "help": f"{md['help']} (default: {default!r})"}
            if md["sources"]:
                g.add_argument(*names, action="append", **kw)
            elif typ is bool:
                g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            elif typ is list or get_origin(typ) is list:
                g.add_argument(*names, nargs="+", **kw)
            else:
                g.add_argument(*names, type=typ, choices=md["choices"], **kw)
    return p


def load_config(argv=None, check_machine: bool = True) -> tuple[Config, list[str]]:
    """Parse flags (and --config) into a validated Config.

    Returns the config and notes to print (e.g. that the demo recipe was used). Raises
    ConfigError listing every problem. check_machine: also what this machine lacks for the
    config (machine_problems: a GPU and bitsandbytes for QLoRA, a GPU for --device cuda).
    """
    args = vars(build_parser().parse_args(argv))
    cfg, problems, notes = Config(), [], []
    recipe = args.pop("config", None)
    args.pop("local_rank", None)
    resume_step = args.pop("resume_step", None)
    if recipe is None and "data.train_file" not in args:
        recipe = str(DEMO_RECIPE)
        notes.append(f"no --config and no --train_file: running the built-in demo ({DEMO_RECIPE.name})")
    if recipe is not None:
        if not Path(recipe).is_file():
            problems.append(f"--config: {recipe} does not exist")
        else:
            apply_yaml(cfg, Path(recipe), problems)
    for dest, value in args.items():
        sec, name = dest.split(".")
        if isinstance(value, list) and dest in ("data.train_file", "data.meta_file") and len(value) == 1:
            value = value[0]  # one source: a plain string, as before
        setattr(getattr(cfg, sec), name, value)
    if resume_step is not None:
        problems += apply_resume_step(cfg, resume_step)
    problems = (machine_problems(cfg) if check_machine else []) + problems + validate(cfg)
    if problems and cfg.data.train_file:  # the data's problems too, so that one run reports everything
        from dreamprm.data.mixing import data_problems
        d = cfg.data
        problems += data_problems(d.train_file, d.meta_file, d.train_format, d.meta_format, not cfg.meta.baseline,
                                  cfg.model.step_tag, d.skip_invalid)
    if problems:
        raise ConfigError(problems)
    capped = effective_max_length(cfg)
    if capped:
        notes.append(capped)
    return cfg, notes


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
        from dreamprm.tiny import TINY_MAX_POSITIONS

        limit, where = TINY_MAX_POSITIONS, "the built-in tiny model"
    if limit is None or cfg.data.max_length <= limit:
        return None
    note = (f"max_length: --max_length {cfg.data.max_length} is more than the model takes "
            f"({limit} positions, {where}); using {limit} for training, evaluation and export")
    cfg.data.max_length = limit
    return note


def apply_resume_step(cfg: Config, n: int) -> list[str]:
    """--resume_step N: with --resume_from auto, resume from output_dir's checkpoint of step N;
    with a --resume_from folder, check that it is that step."""
    r = cfg.run
    root = Path(r.output_dir) / "checkpoints"

    def step_of(name: str):
        m = re.fullmatch(r"step_(\d+)", name)
        return int(m.group(1)) if m else None

    if r.resume_from == "none":
        return [f"--resume_step {n}: contradicts --resume_from none (drop one of them)"]
    if r.resume_from != "auto":
        if step_of(Path(r.resume_from).name) != n:
            return [f"--resume_step {n}: --resume_from {r.resume_from} is not the checkpoint of step {n}; "
                    "pass one of the two"]
        return []
    found = sorted(p for p in root.glob("step_*") if p.is_dir() and step_of(p.name) is not None)
    match = [p for p in found if step_of(p.name) == n]
    if not match:
        have = ", ".join(str(step_of(p.name)) for p in found) or "none"
        return [f"--resume_step {n}: {root} has no checkpoint of step {n} (steps there: {have})"]
    r.resume_from = str(match[0])
    return []


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


def validate(cfg: Config) -> list[str]:
    """Every problem with the config, each naming its flag and the fix."""
    p = []
    d, m, t, meta, r = cfg.data, cfg.model, cfg.train, cfg.meta, cfg.run
    for sec, f, _ in _fields():
        choices = f.metadata["choices"]
        value = getattr(getattr(cfg, sec), f.name)
        if choices and value not in choices:
            p.append(f"--{f.name}: {value!r} is not one of {', '.join(choices)}")
    positive = {"--max_length": d.max_length, "--total_steps": t.total_steps, "--batch_size": t.batch_size,
                "--grad_accum": t.grad_accum, "--meta_batch_size": meta.meta_batch_size,
                "--meta_interval": meta.meta_interval, "--lora_r": m.lora_r, "--save_every": r.save_every,
                "--keep_last": r.keep_last, "--log_every": r.log_every, "--net_hidden": meta.net_hidden,
                "--collective_timeout": r.collective_timeout}
    p += [f"{k}: must be >= 1 (got {v})" for k, v in positive.items() if v < 1]
    nonneg = {"--num_workers": d.num_workers, "--warmup_steps": t.warmup_steps, "--meta_warmup": meta.meta_warmup,
              "--grad_clip": t.grad_clip,
              "--weight_decay": t.weight_decay, "--eval_every": r.eval_every}
    p += [f"{k}: must be >= 0 (got {v})" for k, v in nonneg.items() if v < 0]
    for k, v in {"--lr": t.lr, "--meta_lr": meta.meta_lr, "--fd_radius": meta.fd_radius,
                 "--lora_alpha": m.lora_alpha}.items():
        if not v > 0:
            p.append(f"{k}: must be > 0 (got {v})")
    if not 0 <= m.lora_dropout < 1:
        p.append(f"--lora_dropout: must be in [0, 1) (got {m.lora_dropout})")
    if t.precision == "fp16":
        p.append("--precision: fp16 is not supported (dynamic loss scaling corrupts meta gradients); "
                 "use bf16 on GPUs that have it, or fp32")
    if m.mode == "qlora" and t.precision == "fp32":
        p.append("--precision: qlora computes in bf16; use --precision bf16 with --mode qlora")
    if (meta.hypergrad == "finite_diff" and not meta.baseline and m.mode == "full"
            and t.precision == "bf16"):
        p.append("--hypergrad: finite_diff with --mode full in bf16 loses the perturbation to bf16 "
                 "rounding (see docs); use --hypergrad exact, --mode lora, or --precision fp32")
    if not m.step_tag:
        p.append("--step_tag: must not be empty")
    for flag, path in (("--eval_file", d.eval_file), ("--deepspeed", t.deepspeed)):
        if path and not Path(path).is_file():
            p.append(f"{flag}: {path} does not exist")
    p += _source_problems(cfg)
    if d.train_file and not d.meta_file and not meta.baseline:
        p.append("--meta_file: bilevel training needs a meta file with outcome labels "
                 "(or pass --baseline to train without reweighting)")
    if m.name_or_path and not Path(m.name_or_path).is_dir():
        p.append(f"--model_name: {m.name_or_path} is not a local folder (dreamprm never downloads: "
                 "put a HF checkpoint there, e.g. with `huggingface-cli download`)")
    if r.eval_every and not d.eval_file:
        p.append("--eval_every: set --eval_file too, or --eval_every 0")
    if r.resume_from not in ("auto", "none") and not Path(r.resume_from).is_dir():
        p.append(f"--resume_from: {r.resume_from} is not a checkpoint folder (or use auto / none)")
    if t.deepspeed and Path(t.deepspeed).is_file():
        p += check_ds_json(cfg, Path(t.deepspeed))
    return p


def _source_problems(cfg: Config) -> list[str]:
    """Source specs, mixing, curriculum, profiles and step-loss options; each names the flag (and source)."""
    import math

    from dreamprm.data.mixing import parse_sources

    d, t, meta, p = cfg.data, cfg.train, cfg.meta, []
    train, pt = parse_sources(d.train_file, "--train_file", d.train_format)
    metas, pm = parse_sources(d.meta_file, "--meta_file", d.meta_format)
    p += pt + pm
    for s in train + metas:
        if not Path(s.path).is_file():
            p.append(f"{s.flag}: {s.path} does not exist")
        if s.profile is not None and s.profile not in PROFILE_NAMES:
            p.append(f"{s.flag} {s.path}: profile={s.profile!r} is not one of {', '.join(PROFILE_NAMES)}")
    if d.mix == "weights" and train and not sum(s.weight for s in train) > 0:
        p.append("--mix weights: every --train_file source has weight=0; give at least one a positive weight")
    if d.mix == "learned":
        if meta.baseline or meta.weights != "domain_table":
            p.append("--mix learned: samples by the learned domain weights; it needs --weights domain_table "
                     "and no --baseline")
        if d.num_workers:
            p.append("--mix learned: the sampling probabilities change after every meta pass; use --num_workers 0")
        if len(train) < 2:
            p.append("--mix learned: needs at least two --train_file sources (one domain each) to sample between")
    if not (math.isfinite(d.mix_alpha) and d.mix_alpha >= 0):
        p.append(f"--mix_alpha: must be a finite number >= 0 (got {d.mix_alpha})")
    if not 0 < d.curriculum_start <= 1:
        p.append(f"--curriculum_start: must be in (0, 1] (got {d.curriculum_start})")
    if d.curriculum_steps < 0:
        p.append(f"--curriculum_steps: must be >= 0 (got {d.curriculum_steps})")
    if "{question}" not in d.prompt_template or d.prompt_template.count("{question}") != 1:
        p.append(f"--prompt_template: {d.prompt_template!r} must contain {{question}} exactly once")
    if not (math.isfinite(t.focal_gamma) and t.focal_gamma >= 0):
        p.append(f"--focal_gamma: must be a finite number >= 0 (got {t.focal_gamma})")
    if not (t.pos_fraction == 0 or 0 < t.pos_fraction < 1):
        p.append(f"--pos_fraction: must be in (0, 1), or 0 to measure it on the training data (got {t.pos_fraction})")
    return p


# DeepSpeed JSON keys that the run config owns; a JSON that sets them differently is an error.
_DS_OWNED = {
    "train_micro_batch_size_per_gpu": lambda c, w: c.train.batch_size,
    "gradient_accumulation_steps": lambda c, w: c.train.grad_accum,
    "train_batch_size": lambda c, w: c.train.batch_size * c.train.grad_accum * w,
    "gradient_clipping": lambda c, w: c.train.grad_clip,
}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_ds_json(cfg: Config, path: Path) -> list[str]:
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"--deepspeed: {path}: not valid JSON: {e}"]
    p = []
    w = world_size()
    for key, want in _DS_OWNED.items():
        if key in ds and ds[key] != "auto" and ds[key] != want(cfg, w):
            p.append(f"--deepspeed: {path} sets {key}={ds[key]} but the run config gives {want(cfg, w)} "
                     f"(batch_size={cfg.train.batch_size} x grad_accum={cfg.train.grad_accum} x "
                     f"world={w}); remove {key} from the JSON or set it to \"auto\"")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            p.append(f"--deepspeed: {path} has an {key!r} block; dreamprm builds the optimizer and "
                     "schedule from --lr/--lr_schedule: remove it")
    for key, flag in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = ds.get(key, {}).get("enabled")
        if enabled not in (None, "auto") and enabled != (cfg.train.precision == flag):
            p.append(f"--deepspeed: {path} sets {key}.enabled={enabled} but --precision is "
                     f"{cfg.train.precision}; set it to \"auto\" or remove it")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if cfg.model.mode == "qlora" and stage == 3:
        p.append("--mode qlora cannot run under ZeRO-3 (4-bit weights are not partitioned: "
                 "bitsandbytes/peft known issue); use ds_configs/zero2.json or one GPU without --deepspeed")
    return p


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as YAML: loadable again with --config."""
    from dreamprm.checkpoint import write_text_atomic
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def markdown_reference() -> str:
    """The config reference table in README.md (tests/test_config.py keeps them equal)."""
    rows = ["| flag | YAML key | default | meaning |", "|---|---|---|---|"]
    defaults = Config()
    for sec, f, _ in _fields():
        md = f.metadata
        names = ", ".join(f"`{n}`" for n in (f"--{f.name}", *md["alias"]))
        default = getattr(getattr(defaults, sec), f.name)
        choices = f" ({' / '.join(md['choices'])})" if md["choices"] else ""
        rows.append(f"| {names} | `{sec}.{f.name}` | `{json.dumps(default)}` | {md['help']}{choices} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_reference())
