"""The one config tree: every option, its default, its bounds and its help live here.

A run is configured by a YAML recipe (nested by section) plus command-line flags (flat:
every field name is unique across sections, so ``--lr`` needs no section prefix). The
flags of the original MiniF2F script are accepted as aliases with the same meaning.
Validation collects every problem before reporting, and names the flag of each.

A leaf: it imports the standard library, yaml and dreamprm.errors only, so every module can
import its constants. What can be checked from the config alone is checked here; whatever
looks outside it (data files, model folder, machine, DeepSpeed JSON, checkpoints, lock) is
dreamprm.preflight's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_origin, get_type_hints

import yaml

from dreamprm.errors import ConfigError

DEMO_DIR = Path(__file__).parent / "demo"  # the built-in demo: recipe and bundled data
DEMO_RECIPE = DEMO_DIR / "demo.yaml"
CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints/step_N (checkpoint.tag names the folders)

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
UNMATCHED = ("error", "domain_mean", "one")  # --unmatched_weight: training records --weights_from has no weight for
SCHEDULES = ("constant", "cosine", "linear")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DEVICES = ("auto", "cuda", "cpu")
MIXES = ("size", "temperature", "weights", "learned")
CURRICULA = ("none", "steps", "length", "difficulty")
CURRICULUM_SCHEDULES = ("linear", "sqrt")
STEP_LOSSES = ("ce", "balanced_ce", "focal")
PROFILE_NAMES = ("default", "plain", "problem_solution", "custom")  # data.tokenize.PROFILES + custom
# The reader formats (data.readers.FORMATS maps each to its reader _<name>); "auto" guesses from the keys.
READER_FORMATS = ("dreamprm", "minif2f", "trl", "math_shepherd", "processbench", "prm800k", "minif2f_attempts",
                  "gsm8k_candidates", "mr_gsm8k", "prmbench")
FORMAT_CHOICES = ("auto", *READER_FORMATS)
MODEL_FLAG = "--model_name / --name_or_path"  # model.name_or_path's two flags: messages name both


def says_once() -> bool:
    """Whether this process prints a problem that every rank of a launcher finds alike: the first rank of
    each machine (LOCAL_RANK 0, or no launcher), so that a config error prints once, not once per rank."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


class ArgParser(argparse.ArgumentParser):
    """argparse with a one-line error (the problem and where --help is, not the whole usage), printed once
    under a launcher, and no abbreviated flags (`--total_step 3` is an error, not --total_steps). Subparsers
    are of the same class (argparse's default)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if says_once():
            self._print_message(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n", sys.stderr)
        self.exit(2)


def opt(default, help, choices=None, alias=(), sources=False, ge=None, gt=None, le=None, lt=None, finite=False):
    """A config field with its help text, allowed values, bounds and old-script flag aliases.

    sources: a data-source field (--train_file, --meta_file): the flag may be repeated and YAML
    may give a list; one value stays a plain string (parse_sources reads the specs).
    ge/gt/le/lt: value >= / > / <= / < the bound; finite: no inf (NaN fails every bound)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(metadata={"help": help, "choices": choices, "alias": tuple(alias), "sources": sources,
                           "bounds": bounds, "finite": finite}, **kw)


def _in_bounds(value, md: dict) -> bool:
    b = md["bounds"]
    return (("ge" not in b or value >= b["ge"]) and ("gt" not in b or value > b["gt"])
            and ("le" not in b or value <= b["le"]) and ("lt" not in b or value < b["lt"])
            and (not md["finite"] or math.isfinite(value)))


def _bounds_text(md: dict) -> str:
    """'>= 1', '> 0', 'in [0, 1)', 'a finite number >= 0': the wording of the message and the reference."""
    b = md["bounds"]
    lo = f"[{b['ge']}" if "ge" in b else f"({b['gt']}" if "gt" in b else None
    hi = f"{b['le']}]" if "le" in b else f"{b['lt']})" if "lt" in b else None
    if lo and hi:
        text = f"in {lo}, {hi}"
    else:
        text = (f">= {b['ge']}" if "ge" in b else f"> {b['gt']}" if "gt" in b
                else f"<= {b['le']}" if "le" in b else f"< {b['lt']}")
    return f"a finite number {text}" if md["finite"] else text


@dataclass
class DataConfig:
    train_file: str = opt("", "training data (JSONL/JSON, any format `dreamprm data` reads); repeat the flag "
                          "(or give a YAML list) for several sources, each PATH[,name=N][,format=F][,domain=D]"
                          "[,weight=W][,profile=P]; empty with no --config = the bundled demo data",
                          alias=("--train_json_file",), sources=True)
    meta_file: str = opt("", "meta (held-out, outcome-labelled) data for the hypergradient; repeatable like "
                         "--train_file", alias=("--meta_json_file",), sources=True)
    eval_file: str = opt("", "optional held-out step-labelled file evaluated every eval_every steps")
    train_format: str = opt("auto", "format of train_file (auto = guessed from the first record's keys; "
                            "see `dreamprm data convert --help`)", FORMAT_CHOICES)
    meta_format: str = opt("auto", "format of meta_file", FORMAT_CHOICES)
    eval_format: str = opt("auto", "format of eval_file", FORMAT_CHOICES)
    max_length: int = opt(4096, "tokens per example, capped at the model's max_position_embeddings; "
                          "longer solutions are cut at a step boundary", ge=1)
    skip_invalid: bool = opt(False, "drop invalid records (reported by file:line) instead of failing")
    num_workers: int = opt(0, "DataLoader worker processes for batch collation", ge=0)
    packing: bool = opt(False, "pack the examples of a micro-batch end to end in rows (less padding; no "
                        "attention across examples: sdpa/eager get a block-diagonal mask, flash_attention_2 "
                        "one varlen row); losses, weights and meta passes stay per example")
    mix: str = opt("size", "how training sources are sampled: size = proportional to size; temperature = "
                   "p ~ n^mix_alpha; weights = the sources' weight=; learned = the domain table's learned "
                   "weights (times n^mix_alpha) as sampling probabilities instead of loss weights", MIXES)
    mix_alpha: float = opt(0.5, "exponent of --mix temperature and learned (1 = by size, 0 = uniform over sources)",
                           ge=0, finite=True)
    curriculum: str = opt("none", "easy-to-hard order within each source, by number of steps, tokens, or the "
                          "records' meta.difficulty field", CURRICULA)
    curriculum_start: float = opt(0.2, "share of each source (its easiest) sampled at update 0", gt=0, le=1)
    curriculum_steps: int = opt(0, "updates until the whole of every source is sampled (0 = --total_steps)", ge=0)
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
                        "or added: see add_step_tag); it must occur nowhere in the text, so it may not contain a "
                        "newline or be blank (steps keep their newlines)")
    add_step_tag: bool = opt(True, "a step_tag that is not one token is added as a special token with a new "
                             "embedding row (mean of the others); off = such a tag is an error")
    mode: str = opt("lora", "what trains: full fine-tune, LoRA, or QLoRA (4-bit base, one GPU)", MODES)
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA alpha", gt=0)
    lora_dropout: float = opt(0.05, "LoRA dropout (off during meta passes)", ge=0, lt=1)
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
    total_steps: int = opt(2000, "optimizer updates of the PRM", ge=1)
    epochs: float = opt(0.0, "passes over the training examples kept after cuts and drops, instead of "
                        "--total_steps: total_steps = ceil(epochs x examples / (batch_size x grad_accum x ranks)), "
                        "resolved at start-up (kept on resume) and saved in config.yaml; 0 = off. Both in one "
                        "place are an error; a flag replaces the other one of a recipe", ge=0, finite=True)
    batch_size: int = opt(1, "training examples per rank per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches per PRM update", ge=1)
    lr: float = opt(2e-4, "PRM learning rate", gt=0)
    weight_decay: float = opt(0.0, "PRM AdamW weight decay", ge=0)
    lr_schedule: str = opt("constant", "PRM learning-rate schedule after warm-up", SCHEDULES)
    warmup_steps: int = opt(0, "linear warm-up updates", ge=0)
    grad_clip: float = opt(1.0, "gradient-norm clipping of the PRM (0 = off)", ge=0)
    precision: str = opt("bf16", "bf16 or fp32 (fp16 is not supported: its loss scaling breaks "
                         "meta gradients)", PRECISIONS)
    seed: int = opt(42, "random seed", ge=0, le=2**32 - 1)
    device: str = opt("auto", "auto = the GPU(s) when visible, else the CPU; cuda = fail unless a GPU is "
                      "visible; cpu = train on the CPU even where GPUs are (hides them from torch)", DEVICES)
    step_loss: str = opt("ce", "per-step loss: ce (soft-label cross-entropy), balanced_ce (classes weighted to "
                         "half the loss each), focal", STEP_LOSSES)
    hard_labels: bool = opt(False, "round soft step labels to 0/1 (threshold 0.5) before the loss")
    focal_gamma: float = opt(2.0, "focal loss exponent", ge=0, finite=True)
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
    meta_batch_size: int = opt(0, "meta examples per rank per meta pass; 0 = --batch_size (resolved at start-up "
                               "and saved in config.yaml): a meta pass then fits wherever a training micro-batch "
                               "does, and a one-example meta gradient is too noisy for the weights to learn "
                               "(bench/RESULTS.md, 'Defaults only')", ge=0)
    meta_lr: float = opt(0.1, "weight-module learning rate", gt=0)
    table_optimizer: str = opt("shared_rms", "how table rows step: shared_rms = in proportion to their "
                               "alignment over one shared RMS; row_adam = lazy Adam per row (about meta_lr "
                               "* sign); sgd = meta_lr * gradient", TABLE_OPTIMIZERS)
    meta_interval: int = opt(1, "PRM updates between meta passes", ge=1)
    meta_warmup: int = opt(0, "PRM updates with uniform weights (no meta pass) before the first meta pass",
                           ge=0)
    fd_radius: float = opt(0.01, "finite differences: eps = fd_radius / ||v||; 0.01 keeps bf16 forwards (LoRA on "
                           "a bf16 base) resolved; in fp32 at random init the head's ReLU kinks put single "
                           "instances up to 70 percent off at 0.01 (bench/RESULTS.md)", gt=0)
    aggregation: str = opt("mean_logodds", "step scores -> solution score for the meta loss", AGGREGATIONS)
    meta_loss: str = opt("bce", "meta loss on the solution score", META_LOSSES)
    net_hidden: int = opt(32, "hidden width of the instance_net weight module", ge=1)
    weights_from: str = opt("", "train with the weights an earlier run learned, fixed: its RUN_DIR or its "
                            "instance_weights.jsonl; records matched by id (a domain_table run's by domain name); "
                            "no meta pass, no --meta_file (plain-update speed)")
    unmatched_weight: str = opt("error", "--weights_from: the weight of a training record it has none for: error "
                                "(name them), domain_mean (the mean learned weight of its domain), or one",
                                UNMATCHED)

    @property
    def bilevel(self) -> bool:
        """A meta pass learns the weights: neither --baseline (uniform) nor --weights_from (fixed)."""
        return not self.baseline and not self.weights_from


@dataclass
class RunConfig:
    output_dir: str = opt("runs/dreamprm", "run directory (config, metrics, checkpoints)",
                          alias=("--weights_path",))
    resume_from: str = opt("auto", "checkpoint folder to resume from; auto = output_dir's latest if "
                           "any; none = start fresh (fails if output_dir has checkpoints)")
    resume_step: int = opt(0, "resume from checkpoint step N of --output_dir (the MiniF2F script's flag; dreamprm "
                           "reads the step from the checkpoint, so --resume_from auto alone resumes the latest); "
                           "0 = off", ge=0)
    save_every: int = opt(500, "updates between checkpoints (a final one is always written)", ge=1)
    keep_last: int = opt(3, "checkpoints kept (the newest of the run's lineage; the one resumed from is never "
                         "deleted)", ge=1)
    collective_timeout: int = opt(600, "seconds a collective waits for a silent rank before the job stops, "
                                  "naming it (torch's default is 1800)", ge=1)
    log_every: int = opt(10, "updates between metrics.jsonl lines", ge=1)
    eval_every: int = opt(0, "updates between evaluations on eval_file (0 = off)", ge=0)
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

    def to_yaml(self) -> str:
        """The config as YAML, loadable again with --config (the trainer writes it to RUN/config.yaml)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
        if isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
            return float(value)  # 1e-4: YAML 1.1 wants a dot (1.0e-4); it is meant as a number
        if isinstance(value, str):
            problems.append(f"{where}: {value!r} is not a float (write a number, e.g. 1.0e-4; not quoted)")
            return None
    elif typ is list or get_origin(typ) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif typ is str and isinstance(value, str):
        return value
    problems.append(f"{where}: {value!r} is not a {getattr(typ, '__name__', typ)}")
    return None


_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-4, 5E3: strings to YAML 1.1


def _yaml_with_lines(path: Path, text: str, problems: list[str]):
    """Load YAML keeping the line of every top-level and section key for error messages; a key given twice
    in one mapping (YAML keeps the last silently) is a problem naming both lines."""
    node = yaml.compose(text)
    data = yaml.safe_load(text) or {}
    lines = {}

    def keys(mapping, prefix):
        seen = {}
        for k, v in mapping.value:
            if not isinstance(k, yaml.ScalarNode):  # a list as key: apply_yaml names it as an unknown option
                continue
            line = k.start_mark.line + 1
            if k.value in seen:
                problems.append(f"{path}:{line}: {'.'.join((*prefix, str(k.value)))} is given twice (also at line "
                                f"{seen[k.value]}); keep one")
            seen[k.value] = line
            lines[(*prefix, k.value)] = line
            if not prefix and isinstance(v, yaml.MappingNode):
                keys(v, (k.value,))

    if isinstance(node, yaml.MappingNode):
        keys(node, ())
    return data, lines


def apply_yaml(cfg: Config, path: Path, problems: list[str], given: dict | None = None) -> None:
    """Set the recipe's options on cfg; given (if passed) gets "section.key" -> "FILE:LINE" of each."""
    try:
        text = path.read_text(encoding="utf-8")
        data, lines = _yaml_with_lines(path, text, problems)
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 4]!r}); save the "
                        "recipe as UTF-8")
        return
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{path}: cannot read YAML: {e}")
        return
    except RecursionError:  # yaml's composer recurses once per level
        problems.append(f"{path}: cannot read YAML: nested too deeply (PyYAML stops at a few hundred levels); "
                        "an option's value is at most a list of mappings")
        return
    except ValueError as e:  # yaml's int() past Python's digit limit, or datetime() of a date like 2020-13-45
        limit = sys.get_int_max_str_digits()
        long = re.search(r"\d{%d,}" % (limit + 1), text) if "integer string conversion" in str(e) else None
        if long:
            problems.append(f"{path}:{text.count(chr(10), 0, long.start()) + 1}: an integer has more than {limit} "
                            "digits (Python's limit for reading integers); write it as a float or a string")
        else:
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
                if given is not None:
                    given[f"{sec}.{key}"] = kwhere


def _sections():
    return list(_section_types())


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="launch/train.py",
        description="Train a process reward model with bilevel instance reweighting. "
                    "Options come from --config (YAML, nested by section) and these flags, "
                    "which override it. With neither --config nor --train_file the built-in "
                    "demo runs (tiny PRM, bundled data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    p.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher")
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


def parse_config(argv=None) -> tuple[Config, list[str], list[str]]:
    """(config, its problems, notes to print) from flags and --config; an unknown flag exits (argparse).

    The problems are those of the config alone (validate); dreamprm.preflight.check adds what
    lies outside it and reports both at once. Notes: e.g. that the demo recipe is used."""
    args = vars(build_parser().parse_args(argv))
    cfg, problems, notes, given = Config(), [], [], {}
    recipe = args.pop("config", None)
    args.pop("local_rank", None)
    if recipe is None and "data.train_file" not in args:
        recipe = str(DEMO_RECIPE)
        notes.append(f"no --config and no --train_file: running the built-in demo ({DEMO_RECIPE.name})")
    if recipe is not None:
        if Path(recipe).is_dir():
            problems.append(f"--config: {recipe} is a directory; pass a YAML recipe file (e.g. recipes/minif2f.yaml)")
        elif not Path(recipe).is_file():
            problems.append(f"--config: {recipe} does not exist")
        else:
            apply_yaml(cfg, Path(recipe), problems, given)
    for dest, value in args.items():
        given[dest] = "--" + dest.split(".")[1]
        sec, name = dest.split(".")
        if isinstance(value, list) and dest in ("data.train_file", "data.meta_file") and len(value) == 1:
            value = value[0]  # one source: a plain string, as before
        setattr(getattr(cfg, sec), name, value)
    te, ts = given.get("train.epochs"), given.get("train.total_steps")
    if cfg.train.epochs and ts:  # a flag overrides the recipe, as everywhere; one level giving both is an error
        if te.startswith("--") == ts.startswith("--"):
            problems.append(f"--epochs {cfg.train.epochs:g}: {ts} sets total_steps too; give one of the two "
                            "(--epochs computes total_steps from the training data)")
        elif te.startswith("--"):
            notes.append(f"--epochs {cfg.train.epochs:g} replaces total_steps of {ts}")
        else:
            notes.append(f"--total_steps {cfg.train.total_steps} replaces epochs of {te}")
            cfg.train.epochs = 0.0
    problems += validate(cfg)
    if cfg.meta.bilevel and not cfg.meta.meta_batch_size:  # the default: one meta example per training example
        cfg.meta.meta_batch_size = cfg.train.batch_size  # of a micro-batch (a fixed number could exceed memory)
    return cfg, problems, notes + warnings(cfg)


def warnings(cfg: Config) -> list[str]:
    """What the config allows but a user rarely means (printed, the run goes on)."""
    t, out = cfg.train, []
    if t.warmup_steps and not t.epochs and t.warmup_steps >= t.total_steps:
        out.append(f"warning: --warmup_steps {t.warmup_steps} >= --total_steps {t.total_steps}: the learning rate "
                   f"never reaches --lr {t.lr:g} (it ends at {t.lr * t.total_steps / t.warmup_steps:.3g}); lower "
                   "--warmup_steps")
    return out


def load_config(argv=None) -> tuple[Config, list[str]]:
    """parse_config for code that checks nothing outside the config (tests, workers, tools): (config,
    notes), or ConfigError listing every problem."""
    cfg, problems, notes = parse_config(argv)
    if problems:
        raise ConfigError(problems)
    return cfg, notes


def validate(cfg: Config) -> list[str]:
    """Every problem of the config itself, each naming its flag and the fix."""
    p = []
    d, m, t, meta, r = cfg.data, cfg.model, cfg.train, cfg.meta, cfg.run
    for sec, f, typ in _fields():
        md, value = f.metadata, getattr(getattr(cfg, sec), f.name)
        if md["choices"] and value not in md["choices"]:
            p.append(f"--{f.name}: {value!r} is not one of {', '.join(md['choices'])}")
        if typ is float and isinstance(value, float) and not math.isfinite(value):  # every float: NaN, inf never mean
            want = _bounds_text({**md, "finite": True}) if md["bounds"] else "a finite number"  # anything here
            p.append(f"--{f.name}: must be {want} (got {value})")
        elif (md["bounds"] or md["finite"]) and not _in_bounds(value, md):
            p.append(f"--{f.name}: must be {_bounds_text(md)} (got {value})")
    if not (t.pos_fraction == 0 or 0 < t.pos_fraction < 1):  # 0 has a meaning of its own: say it
        p.append(f"--pos_fraction: must be in (0, 1), or 0 to measure it on the training data (got {t.pos_fraction})")
    if t.precision == "fp16":
        p.append("--precision: fp16 is not supported (dynamic loss scaling corrupts meta gradients); "
                 "use bf16 on GPUs that have it, or fp32")
    if m.mode == "qlora" and t.precision == "fp32":
        p.append("--precision: qlora computes in bf16; use --precision bf16 with --mode qlora")
    if (meta.hypergrad == "finite_diff" and not meta.baseline and m.mode == "full"
            and t.precision == "bf16"):
        p.append("--hypergrad: finite_diff with --mode full in bf16 loses the perturbation to bf16 "
                 "rounding (see docs); use --hypergrad exact, --mode lora, or --precision fp32")
    if "\n" in m.step_tag:  # TRL's step separator: dreamprm marks steps with a token found nowhere else
        p.append(f"--step_tag: {m.step_tag!r} contains a newline. dreamprm places the tag after every step and "
                 "finds the steps by it, so it must occur nowhere else, and newlines occur inside steps, questions "
                 "and chat templates (steps keep them: a step is one list item, not one line). TRL-style data "
                 f"needs no separator: --train_format trl reads its step lists; keep --step_tag {DEFAULT_STEP_TAG} "
                 "(added as a special token when the tokenizer lacks it)")
    elif not m.step_tag.strip():
        p.append(f"--step_tag: {m.step_tag!r} is blank; keep the default {DEFAULT_STEP_TAG} or pick a tag that "
                 "occurs nowhere in the data")
    p += _source_problems(cfg)
    p += _transfer_problems(cfg)
    if d.train_file and not d.meta_file and not meta.baseline and not meta.weights_from:
        p.append("--meta_file: bilevel training needs a meta file with outcome labels "
                 "(or pass --baseline to train without reweighting)")
    if not r.output_dir.strip():
        p.append("--output_dir: must not be empty (the run directory: config, metrics, checkpoints)")
    if r.eval_every and not d.eval_file:
        p.append("--eval_every: set --eval_file too, or --eval_every 0")
    if r.resume_step and r.resume_from == "none":
        p.append(f"--resume_step {r.resume_step}: contradicts --resume_from none (drop one of them)")
    return p


# What only the meta pass reads: with --weights_from (fixed weights, no meta pass) a value other than the
# default would be silently ignored, so it is refused (a recipe of a bilevel run is not reused as it is).
META_PASS_ONLY = ("weights", "hypergrad", "meta_batch_size", "meta_lr", "table_optimizer", "meta_interval",
                  "meta_warmup", "fd_radius", "aggregation", "meta_loss", "net_hidden")


def _transfer_problems(cfg: Config) -> list[str]:
    """--weights_from against the options it contradicts, each message naming both flags."""
    meta, d = cfg.meta, cfg.data
    if not meta.weights_from:
        if meta.unmatched_weight != "error":
            return [f"--unmatched_weight {meta.unmatched_weight}: applies only with --weights_from RUN_DIR; "
                    "drop it"]
        return []
    head = f"--weights_from {meta.weights_from}: trains with fixed weights and no meta pass"
    p = []
    if meta.baseline:
        p.append(f"{head}, --baseline with uniform weights: give one of the two")
    if d.meta_file:
        p.append(f"{head}, so --meta_file is not read: drop --meta_file (or drop --weights_from to learn the "
                 "weights)")
    if d.mix == "learned":
        p.append(f"{head}, --mix learned samples by weights the meta pass learns: use --mix size/temperature/"
                 "weights (or drop --weights_from)")
    default = MetaConfig()
    for name in META_PASS_ONLY:
        if getattr(meta, name) != getattr(default, name):
            p.append(f"{head}, --{name} {getattr(meta, name)} is a meta-pass option: drop it (or drop "
                     "--weights_from to learn the weights)")
    return p


def _source_problems(cfg: Config) -> list[str]:
    """Source specs, mixing and prompt-profile rules; each names the flag (and source)."""
    d, meta, p = cfg.data, cfg.meta, []
    train, pt = parse_sources(d.train_file, "--train_file", d.train_format)
    metas, pm = parse_sources(d.meta_file, "--meta_file", d.meta_format)
    p += pt + pm
    for s in train + metas:
        if s.profile is not None and s.profile not in PROFILE_NAMES:
            p.append(f"{s.flag} {s.path}: profile={s.profile!r} is not one of {', '.join(PROFILE_NAMES)}")
    if d.mix == "weights" and train and not sum(s.weight for s in train) > 0:
        p.append("--mix weights: every --train_file source has weight=0; give at least one a positive weight")
    if d.mix == "learned" and not meta.weights_from:  # with it: _transfer_problems says so
        if meta.baseline or meta.weights != "domain_table":
            p.append("--mix learned: samples by the learned domain weights; it needs --weights domain_table "
                     "and no --baseline")
        if d.num_workers:
            p.append("--mix learned: the sampling probabilities change after every meta pass; use --num_workers 0")
        if len(train) < 2:
            p.append("--mix learned: needs at least two --train_file sources (one domain each) to sample between")
    if "{question}" not in d.prompt_template or d.prompt_template.count("{question}") != 1:
        p.append(f"--prompt_template: {d.prompt_template!r} must contain {{question}} exactly once")
    return p


# ---------------------------------------------------------------- data sources
#
# A source is given as ``PATH`` or ``PATH,key=value,...`` (``--train_file`` repeated, or a YAML
# list whose items are such strings or mappings with the same keys):
#
#     name     the source's name in logs (default: the file name without extension)
#     format   reader format (default: --train_format / --meta_format)
#     domain   domain of every record of the source (default: the source's name when there are
#              several sources; with one source the records' own ``domain`` field, as before)
#     weight   mixing weight for --mix weights (default 1)
#     profile  prompt profile (data.tokenize.PROFILES; default: --profile)

SOURCE_KEYS = ("name", "format", "domain", "weight", "profile")


@dataclass
class Source:
    flag: str  # --train_file or --meta_file, for messages
    path: str
    name: str
    format: str
    domain: str | None  # None: the records' own domain field
    weight: float = 1.0
    profile: str | None = None  # None: the run's --profile

    def where(self) -> str:
        return f"{self.flag} {self.path}" + (f" (source {self.name!r})" if self.name != Path(self.path).stem else "")


def source_specs(value) -> list:
    """The list of source specs in a config value: '' -> [], 'F' -> ['F'], lists as they are."""
    if value in ("", None):
        return []
    return [value] if isinstance(value, (str, dict)) else list(value)


def parse_sources(value, flag: str, default_format: str) -> tuple[list[Source], list[str]]:
    """(sources, problems) for a --train_file / --meta_file value; every problem names the flag and spec."""
    specs, out, problems = source_specs(value), [], []
    for spec in specs:
        if isinstance(spec, str):
            path, *rest = spec.split(",")
            kv = {}
            for item in rest:
                k, sep, v = item.partition("=")
                if not sep:
                    problems.append(f"{flag} {spec!r}: {item!r} is not key=value (keys: {', '.join(SOURCE_KEYS)})")
                    continue
                kv[k.strip()] = v.strip()
        elif isinstance(spec, dict):
            kv = {k: v for k, v in spec.items() if k != "path"}
            path = spec.get("path", "")
        else:
            problems.append(f"{flag}: {spec!r} is neither 'PATH,key=value,...' nor a mapping with a path")
            continue
        path = str(path).strip()
        bad = sorted(set(kv) - set(SOURCE_KEYS))
        if bad:
            problems.append(f"{flag} {path}: unknown source key(s) {bad} (keys: {', '.join(SOURCE_KEYS)})")
        if not path:
            problems.append(f"{flag} {spec!r}: no path")
            continue
        try:
            weight = float(kv.get("weight", 1.0))
        except (TypeError, ValueError):
            problems.append(f"{flag} {path}: weight={kv['weight']!r} is not a number")
            weight = 1.0
        if not (math.isfinite(weight) and weight >= 0):
            problems.append(f"{flag} {path}: weight={kv.get('weight')} must be a finite number >= 0")
        if kv.get("format") not in (None, "", *FORMAT_CHOICES):
            problems.append(f"{flag} {path}: format={kv['format']!r} is not one of {', '.join(FORMAT_CHOICES)}")
        name = str(kv.get("name") or Path(path).stem)
        out.append(Source(flag, path, name, str(kv.get("format") or default_format),
                          None if kv.get("domain") in (None, "") else str(kv["domain"]), weight,
                          None if kv.get("profile") in (None, "") else str(kv["profile"])))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"{flag}: several sources are named {dup}; give them distinct name=... (or domain=...)")
    if len(out) > 1:  # several sources: the source's name is its default domain
        for s in out:
            if s.domain is None:
                s.domain = s.name
    return out, problems


def run_sources(cfg: Config) -> tuple[list[Source], list[Source]]:
    """The training and meta sources of the run (the bundled demo files when --train_file is empty)."""
    d = cfg.data
    if not d.train_file:
        return ([Source("--train_file", str(DEMO_DIR / "train.jsonl"), "train", "minif2f", None)],
                [Source("--meta_file", str(DEMO_DIR / "meta.jsonl"), "meta", "minif2f", None)])
    train, p1 = parse_sources(d.train_file, "--train_file", d.train_format)
    meta, p2 = parse_sources(d.meta_file, "--meta_file", d.meta_format)
    if p1 or p2:  # parse_config reported them; a Config built in code may not have been checked
        raise ConfigError(p1 + p2)
    return train, meta


def markdown_reference() -> str:
    """The config reference table in README.md (tests/test_config.py keeps them equal)."""
    rows = ["| flag | YAML key | default | meaning |", "|---|---|---|---|"]
    defaults = Config()
    for sec, f, _ in _fields():
        md = f.metadata
        names = ", ".join(f"`{n}`" for n in (f"--{f.name}", *md["alias"]))
        default = getattr(getattr(defaults, sec), f.name)
        choices = f" ({' / '.join(md['choices'])})" if md["choices"] else ""
        bounds = f" ({_bounds_text(md)})" if md["bounds"] or md["finite"] else ""
        rows.append(f"| {names} | `{sec}.{f.name}` | `{json.dumps(default)}` | {md['help']}{choices}{bounds} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_reference())
