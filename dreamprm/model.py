"""The process reward model: a Hugging Face backbone plus the Qwen2.5-Math-PRM head at step-tag positions.

Layout (same as Qwen2ForProcessRewardModel, so exported folders load in its code and vice versa):
  model.*  the base transformer (e.g. Qwen2Model); no LM head is kept (it would cost vocab x hidden memory)
  score    Sequential(Linear(h, h), ReLU(), Linear(h, 2)); softmax(logits)[..., 1] is P(step correct).

Precision: bf16/fp16 load the backbone in that dtype; the head and the LoRA adapters stay fp32 (peft's
autocast_adapter_dtype), so small updates to trainable weights are not rounded away.
Nothing here downloads: every path is a local folder (model.name_or_path "" is the built-in tiny model).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from dreamprm.config import ATTN_IMPLEMENTATIONS, DEFAULT_STEP_TAG, MODES, PRECISIONS
from dreamprm.errors import ModelError

log = logging.getLogger(__name__)

# bitsandbytes (imported by peft when installed) logs on AVX512-BF16 CPUs that an optional faster
# 4-bit kernel package is absent; its own CPU kernel is used instead. Known harmless: silenced.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _peft_wrap(fn, *args, **kwargs):
    """fn(*args, **kwargs) for peft's model wrappers, which read transformers' deprecated
    `is_gradient_checkpointing` property (a FutureWarning on every run; harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return fn(*args, **kwargs)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert set(DTYPES) == set(PRECISIONS)
PRM_ARCH = "Qwen2ForProcessRewardModel"
HEAD_KEYS = {"0.weight", "0.bias", "2.weight", "2.bias"}
HEAD_FILE = "score.safetensors"  # head weights next to a PEFT adapter


class PRM(nn.Module):
    """Backbone + 2-class head applied only at the step-tag positions (never full-vocabulary logits)."""

    def __init__(self, model: nn.Module, hidden: int):
        super().__init__()
        self.model = model
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, input_ids, attention_mask, tag_pos, position_ids=None):
        """input_ids, attention_mask [B,S]; tag_pos [B,K] long -> logits [B,K,2] float32.

        Packed batch (dreamprm.data.packing.collate_packed): position_ids [R,S] restart at every
        example, attention_mask is None and tag_pos [N,K] are flat indices into the R*S tokens ->
        logits [N,K,2], one row per example.
        """
        if position_ids is None:
            h = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            h = torch.gather(h, 1, tag_pos.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        else:
            h = self.model(input_ids=input_ids, attention_mask=None, position_ids=position_ids,
                           use_cache=False).last_hidden_state
            h = h.reshape(-1, h.size(-1))[tag_pos]
        return self.score(h.to(self.score[0].weight.dtype)).float()


def step_probs(logits: torch.Tensor) -> torch.Tensor:
    """P(step correct) from PRM logits [..., 2]."""
    return logits.float().softmax(-1)[..., 1]


def resolve_attn(name: str) -> str:
    """'auto' -> flash_attention_2 when flash-attn and CUDA are there, else sdpa; never a silent swap."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ModelError(f"model.attn_implementation {name!r} is not one of {ATTN_IMPLEMENTATIONS}")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
    if name == "flash_attention_2" and not has_flash:
        raise ModelError("model.attn_implementation is flash_attention_2 but the flash_attn package is not "
                          "installed: `pip install dreamprm[flash]` (needs CUDA to build), or pass "
                          "--attn_implementation sdpa")
    return name


def check_model_dir(path) -> Path:
    """The folder must hold config.json, weights and tokenizer files; report everything missing at once."""
    p = Path(path).expanduser()
    want = ("a Hugging Face model folder holds config.json, the weights (*.safetensors) and the tokenizer "
            "files (tokenizer.json / tokenizer_config.json). dreamprm never downloads: fetch one with "
            "`huggingface-cli download ORG/NAME --local-dir DIR` and pass DIR, or leave --model_name / "
            "--name_or_path (model.name_or_path) empty for the built-in tiny model")
    if not p.is_dir():
        raise ModelError(f"model folder {str(path)!r} does not exist ({p.resolve()}); {want}")
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        missing.append("weights (*.safetensors)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        missing.append("tokenizer files (tokenizer.json, tokenizer_config.json)")
    if missing and ggufs:
        raise ModelError(
            f"model folder {p} holds only GGUF weights ({', '.join(ggufs)}), which dreamprm does not train "
            f"from (it lacks {', '.join(missing)}). Convert it once into a Hugging Face folder: for SmolLM2 "
            f"run `dreamprm smollm2 --gguf {p / ggufs[0]}`; for another GGUF, "
            f"`pip install gguf` and save AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME) and "
            f"AutoTokenizer.from_pretrained(DIR, gguf_file=NAME) with save_pretrained (see dreamprm/smollm2.py)")
    if missing:
        raise ModelError(f"model folder {p} lacks {', '.join(missing)}; {want}")
    return p.resolve()


def load_tokenizer(path, step_tag: str, trust_remote_code: bool = False, add_tag: bool = True):
    """AutoTokenizer from a local folder, with the step tag as exactly one token of it.

    data.tokenize.check_step_tag must pass: one token alone and in every probe context. When it does
    not and add_tag, the tag is added as a special token (split out before the tokenizer's own model
    runs, so it can no longer merge; a new id gets an embedding row from grow_embeddings) and checked
    again. ModelError, naming the tag, the tokenizer and an example, when it still fails.
    """
    from transformers import AddedToken, AutoTokenizer

    from dreamprm.data.tokenize import check_step_tag

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        check_step_tag(tok, step_tag)
    except ModelError:
        if not add_tag:
            raise
        tok.add_tokens([AddedToken(step_tag, special=True, normalized=False, lstrip=False, rstrip=False,
                                   single_word=False)], special_tokens=True)
        check_step_tag(tok, step_tag)
        log.info("step tag %r added to the tokenizer of %s as special token id %d", step_tag, path,
                 tok.convert_tokens_to_ids(step_tag))
    return tok


def grow_embeddings(backbone, tok, path) -> int:
    """Give every token of tok an input-embedding row; returns the number of rows added.

    New rows (tokens past the checkpoint's vocabulary, e.g. an added step tag) start as the mean
    of the checkpoint's rows: deterministic, so a LoRA run (embeddings frozen) and every rebuild of
    it from the base folder (checkpoint scoring, adapter export) get the same row, and close to what
    the model has seen, unlike the random rows of a fresh init. Rows the checkpoint already has are
    never changed. Under ZeRO-3, transformers' resize gathers the old matrix and leaves a whole
    (unpartitioned) new one, which DeepSpeed partitions when the engine starts.
    """
    emb = backbone.get_input_embeddings()
    n_old = emb.weight.ds_shape[0] if hasattr(emb.weight, "ds_shape") else emb.num_embeddings
    if len(tok) <= n_old:
        return 0
    backbone.resize_token_embeddings(len(tok), mean_resizing=False)
    w = backbone.get_input_embeddings().weight
    if hasattr(w, "ds_id") or w.shape[0] != len(tok):
        raise ModelError(f"growing the embeddings of {path} to {len(tok)} rows left a {tuple(w.shape)} "
                         "(partitioned) matrix; this transformers/DeepSpeed pair resizes differently")
    with torch.no_grad():
        w[n_old:] = w[:n_old].float().mean(0).to(w.dtype)
    return len(tok) - n_old


def _read_head(path: Path) -> dict | None:
    """score.* tensors of a PRM checkpoint (safetensors, else torch.load weights_only), None if absent."""
    from safetensors import safe_open

    head = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            head.update({k[6:]: sf.get_tensor(k) for k in sf.keys() if k.startswith("score.")})  # noqa: SIM118
    if not head:
        for f in sorted(path.glob("*.bin")):
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            head.update({k[6:]: v for k, v in sd.items() if k.startswith("score.")})
    if head and set(head) != HEAD_KEYS:
        raise ModelError(f"{path} has a score head with keys {sorted('score.' + k for k in head)}; dreamprm "
                         f"reads the {PRM_ARCH} layout score.0.*, score.2.* (Linear, ReLU, Linear)")
    return head or None


def _load_backbone(path: Path, precision: str, attn: str, trust_remote_code: bool, quantize: bool):
    """Base transformer without LM head (the checkpoint's 'model.' prefix is stripped by from_pretrained)."""
    from transformers import MODEL_MAPPING, AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    # The real Qwen2.5-Math-PRM maps AutoModel to its whole remote PRM class: take the library's base class.
    cls = MODEL_MAPPING.get(type(config), AutoModel)
    kw = {"config": config, "dtype": DTYPES[precision], "attn_implementation": resolve_attn(attn),
          "local_files_only": True, "output_loading_info": True}
    if cls is AutoModel:
        kw["trust_remote_code"] = trust_remote_code
    if quantize:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[precision],
            bnb_4bit_use_double_quant=True)
        kw["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report lists the head/lm_head keys we skip on purpose
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # a "Loading weights" bar is noise in a log file
    try:
        model, info = cls.from_pretrained(str(path), **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:
        raise ModelError(f"{path}: backbone weights missing from the checkpoint: "
                         f"{sorted(info['missing_keys'])}")
    other = sorted(k for k in info["unexpected_keys"] if not k.startswith(("score.", "lm_head.")))
    if other:
        log.warning("%s: checkpoint keys not used by the backbone: %s", path, other)
    if quantize:
        _no_cpu_bf16_repack(model)
    return model


def _no_cpu_bf16_repack(model) -> None:
    """Keep bitsandbytes' 4-bit layers on their training kernel in eval mode.

    On a CPU with AVX512-BF16, Linear4bit repacks its weights for a bf16 kernel the first time it runs
    without grad in eval mode: scores then differ from the training forward and from the dequantized
    (merged) export by up to ~0.04 per matmul (measured on the tiny model). Scoring must see the model
    that was trained, so that path is switched off.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _load(path: Path, precision: str, attn: str, trust_remote_code: bool, quantize: bool,
          want_head: bool = True) -> tuple[PRM, bool]:
    """(PRM, head loaded): the checkpoint's head if it is a PRM folder, else a fresh one (global RNG)."""
    backbone = _load_backbone(path, precision, attn, trust_remote_code, quantize)
    prm = PRM(backbone, backbone.config.hidden_size)
    head = _read_head(path) if want_head else None
    if want_head and head is None and PRM_ARCH in (backbone.config.architectures or []):
        raise ModelError(f"{path} says {PRM_ARCH} but has no score.0/score.2 weights")
    if head is not None:
        prm.score.load_state_dict({k: v.float() for k, v in head.items()})
    prm.score.to(next(backbone.parameters()).device)
    return prm, head is not None


def _enable_checkpointing(model, reentrant: bool):
    kw = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; also hooks input grads
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.enable_input_require_grads()  # reentrant checkpointing of a frozen base needs inputs with grad


def _lora_targets(model, wanted: list[str]) -> list[str]:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    found = [t for t in wanted if t in names]
    if not found:
        raise ModelError(f"none of model.lora_targets {list(wanted)} is a linear layer of this model; "
                         f"its linear layers are named {names}")
    if len(found) < len(wanted):
        log.warning("model.lora_targets %s are not in this model; LoRA goes on %s",
                    [t for t in wanted if t not in names], found)
    return found


def model_dir(mcfg) -> Path:
    """The run's model folder, checked: --model_name, or the built-in tiny model (built once)."""
    if mcfg.name_or_path:
        return check_model_dir(mcfg.name_or_path)
    from dreamprm.tiny import default_tiny_dir

    return check_model_dir(default_tiny_dir())


# The files of a model folder that make the model a run trains on top of: what a fingerprint covers.
BASE_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
              "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def checkpoint_holds_base(mcfg) -> bool:
    """Whether a run's checkpoints hold the whole PRM. A full fine-tune trains its base; the built-in
    tiny model has no folder named in the config (it is rebuilt from code that may change between
    versions) and costs a few MB. LoRA and QLoRA on a named folder save only what trains and rebuild
    the frozen base from that folder, checked against the fingerprint taken when the run started."""
    return mcfg.mode == "full" or not mcfg.name_or_path


def base_files(folder: Path) -> list[str]:
    """The files of a model folder that make the model (BASE_FILES), sorted: the same on every rank."""
    return sorted({f.name for pat in BASE_FILES for f in Path(folder).glob(pat) if f.is_file()})


def base_fingerprint(folder: Path, part: int = 0, parts: int = 1) -> dict:
    """{"path", "files": {name: {"bytes", "sha256"}}} of a base model folder (the BASE_FILES in it).

    The full SHA-256, not size and mtime: a faithful copy (cp, rsync without -t, a node-local stage-in)
    changes every mtime, and a rewrite that keeps the size can keep the mtime too; the cost is one read
    of the base (bench/RESULTS.md), taken once when a run starts and once per export or load_scorer.
    part/parts: this rank's share of the files (the caller gathers the shares)."""
    from dreamprm.checkpoint import describe_files

    folder = Path(folder).resolve()
    return {"path": str(folder), "files": describe_files(folder, base_files(folder)[part::parts])}


def base_differences(recorded: dict, current: dict) -> list[str]:
    """What differs between the fingerprint a checkpoint records and a folder's now (empty: the same)."""
    was, now = recorded["files"], current["files"]
    out = [f"{n} is missing" for n in sorted(set(was) - set(now))]
    out += [f"{n} is new" for n in sorted(set(now) - set(was))]
    for n in sorted(set(was) & set(now)):
        if was[n]["bytes"] != now[n]["bytes"]:
            out.append(f"{n} has {now[n]['bytes']:,} bytes, the run's base had {was[n]['bytes']:,}")
        elif was[n]["sha256"] != now[n]["sha256"]:
            out.append(f"{n} has the same size but another SHA-256 (its content changed)")
    return out


def base_mismatch(recorded: dict, current: dict, what: str) -> str | None:
    """The one message for a base folder whose files are not those a run started from, None when they
    are (wherever the folder is). what: the checkpoint and what is being done ("cannot resume from CKPT")."""
    diffs = base_differences(recorded, current)
    if not diffs:
        return None
    where = current["path"] + ("" if current["path"] == recorded["path"] else f" (the run started from "
                               f"{recorded['path']})")
    return (f"{what}: it holds only the trained weights (LoRA adapters, head) and is rebuilt on the base model "
            f"folder {where}, whose files are not the ones the run started from: " + "; ".join(diffs)
            + ". Put the original files back (a copy with the same contents is fine)")


def training_tokenizer(mcfg):
    """The tokenizer a run trains with (the step tag added when it is not one token): build_prm's, loaded
    without the model, so the data can be read and encoded before the engine exists."""
    return load_tokenizer(model_dir(mcfg), mcfg.step_tag, mcfg.trust_remote_code, mcfg.add_step_tag)


def build_prm(mcfg, precision: str = "fp32", tokenizer=None):
    """PRM and tokenizer for training, from a local causal-LM or PRM folder (mcfg: config.ModelConfig).

    A PRM folder (architectures has Qwen2ForProcessRewardModel, or the weights have score.0.weight) keeps
    its head; a causal-LM folder gets a fresh head from the global RNG (seed before calling). A step tag
    the tokenizer lacks is added with a new embedding row (load_tokenizer, grow_embeddings).
    mcfg.gc_reentrant: reentrant activation checkpointing instead of the default non-reentrant one.
    tokenizer: training_tokenizer(mcfg), when the caller has it already.
    """
    problems = []
    if mcfg.mode not in MODES:
        problems.append(f"model.mode {mcfg.mode!r} is not one of {MODES}")
    if precision not in DTYPES:
        problems.append(f"precision {precision!r} is not one of {tuple(DTYPES)}")
    if mcfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        problems.append(f"model.attn_implementation {mcfg.attn_implementation!r} is not one of {ATTN_IMPLEMENTATIONS}")
    if problems:
        raise ModelError("; ".join(problems))
    path = model_dir(mcfg)
    tok = tokenizer if tokenizer is not None else training_tokenizer(mcfg)
    prm, _ = _load(path, precision, mcfg.attn_implementation, mcfg.trust_remote_code, mcfg.mode == "qlora")
    grow_embeddings(prm.model, tok, path)
    return prepare_for_training(prm, mcfg), tok


def prepare_for_training(prm: PRM, mcfg) -> PRM:
    """What build_prm does once the weights are loaded: activation checkpointing (mcfg.gc_reentrant picks
    the reentrant kind), LoRA (QLoRA: k-bit preparation first) and a trainable head. Public so that a PRM
    around another backbone (bench/gpu.py's random 7B) trains exactly like a loaded one."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if mcfg.mode == "qlora":
        prepare_model_for_kbit_training(prm.model, use_gradient_checkpointing=mcfg.gradient_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": mcfg.gc_reentrant})
    elif mcfg.gradient_checkpointing:
        _enable_checkpointing(prm.model, mcfg.gc_reentrant)
    if mcfg.mode != "full":
        lcfg = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                          target_modules=_lora_targets(prm.model, mcfg.lora_targets), bias="none")
        prm.model = _peft_wrap(get_peft_model, prm.model, lcfg)  # freezes the backbone; adapters fp32
    prm.score.requires_grad_(True)
    return prm.train()


def _is_peft(prm: PRM) -> bool:
    from peft import PeftModel

    return isinstance(prm.model, PeftModel)


def _backbone(prm: PRM):
    return prm.model.get_base_model() if _is_peft(prm) else prm.model


def state_dict_for_export(prm: PRM) -> dict[str, torch.Tensor]:
    """Full weights in the Qwen2ForProcessRewardModel layout: LoRA merged, 4-bit weights dequantized.

    Does not modify prm. Under ZeRO-3 call it inside GatheredParameters (an empty shard raises).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    base = _backbone(prm)
    dtype = base.get_input_embeddings().weight.dtype
    out, done = {}, []
    with torch.no_grad():
        for name, mod in base.named_modules():
            if any(name.startswith(d + ".") for d in done):
                continue
            is_lora = isinstance(mod, LoraLayer)
            layer = mod.get_base_layer() if is_lora else mod
            if not (is_lora or type(getattr(layer, "weight", None)).__name__ == "Params4bit"):
                continue
            w = dequantize_module_weight(layer).float()
            for a in (mod.active_adapters if is_lora else []):
                if a in mod.lora_A:
                    w = w + mod.get_delta_weight(a).float()
            out[f"model.{name}.weight"] = w.to(dtype)
            if getattr(layer, "bias", None) is not None:
                out[f"model.{name}.bias"] = layer.bias.detach().to(dtype)
            done.append(name)
        for k, v in base.state_dict().items():
            if not any(k.startswith(d + ".") for d in done):
                out[f"model.{k}"] = v.detach()
        out.update({f"score.{k}": v.detach() for k, v in prm.score.state_dict().items()})
    empty = [k for k, v in out.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"empty tensors {empty[:3]}...: ZeRO-3 partitioned parameters must be gathered "
                           "(deepspeed.zero.GatheredParameters) before export")
    return {k: v.contiguous() for k, v in out.items()}


def save_prm(prm: PRM, out_dir, tokenizer, step_tag: str, merge_lora: bool = True) -> Path:
    """Write a folder loadable as Qwen2ForProcessRewardModel (config.json, model.safetensors, tokenizer).

    Non-Qwen2 backbones keep their own architectures entry (no PRM class exists for them); the folder is
    still recognised by dreamprm through its score.0.weight key. merge_lora=False on a LoRA PRM writes
    the adapter form instead (save_adapter).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_peft(prm) and not merge_lora:
        return save_adapter(prm, out, tokenizer, step_tag)
    sd = state_dict_for_export(prm)
    base = _backbone(prm)
    cfg = copy.deepcopy(base.config)
    for k in ("quantization_config", "_pre_quantization_dtype"):
        cfg.__dict__.pop(k, None)  # the export is dequantized
    if cfg.model_type == "qwen2":
        cfg.architectures = [PRM_ARCH]
    cfg.dreamprm_step_tag = step_tag
    cfg.dreamprm_step_tag_id = tokenizer.convert_tokens_to_ids(step_tag)
    cfg.dtype = base.get_input_embeddings().weight.dtype
    cfg.save_pretrained(out)
    d = json.loads((out / "config.json").read_text())
    d["num_labels"] = 2  # transformers 5 omits it when it equals its default; Qwen's PRM config states it
    if _write_modeling_file(out, type(base.config), type(base)):
        d["auto_map"] = {k: f"{REMOTE_MODULE}.{REMOTE_CLASS}"
                         for k in ("AutoModel", "AutoModelForTokenClassification")}
    (out / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


REMOTE_MODULE, REMOTE_CLASS = "modeling_dreamprm", "DreamPRMForProcessReward"


def _write_modeling_file(out: Path, config_cls, backbone_cls) -> bool:
    """Copy dreamprm/hf_modeling.py to out as the trust_remote_code module, importing this backbone's
    classes; False (with a warning) when transformers does not export them by name."""
    import transformers

    names = (config_cls.__name__, backbone_cls.__name__)
    if not all(getattr(transformers, n, None) is c for n, c in zip(names, (config_cls, backbone_cls))):
        log.warning("%s: no %s.py written (transformers does not export %s by name); the folder loads with "
                    "dreamprm.model.load_prm and dreamprm.scoring.load_scorer only", out, REMOTE_MODULE, names)
        return False
    src = (Path(__file__).parent / "hf_modeling.py").read_text()
    line = next(ln for ln in src.splitlines() if ln.endswith("# dreamprm: backbone line"))
    new = f"from transformers import {names[0]} as BackboneConfig, {names[1]} as Backbone  # dreamprm: backbone line"
    (out / f"{REMOTE_MODULE}.py").write_text(src.replace(line, new))
    return True


def save_adapter(prm: PRM, out_dir, tokenizer=None, step_tag: str = DEFAULT_STEP_TAG) -> Path:
    """PEFT adapter (adapter_config.json, adapter_model.safetensors) + head (score.safetensors).

    load_prm rebuilds base + adapter + head; the base folder is adapter_config.json's
    base_model_name_or_path (an absolute local path), re-quantized to 4 bits for a QLoRA adapter so scores
    match training. Under ZeRO-3 gather the parameters first.
    """
    from safetensors.torch import load_file, save_file

    if not _is_peft(prm):
        raise ValueError("save_adapter needs a LoRA/QLoRA PRM (model.mode lora or qlora); use save_prm")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prm.model.save_pretrained(str(out), save_embedding_layers=False)
    saved = load_file(str(out / "adapter_model.safetensors"))
    if not saved or any(v.numel() == 0 for v in saved.values()):
        raise RuntimeError(f"{out}/adapter_model.safetensors is empty: gather ZeRO-3 parameters first")
    head = {k: v.detach().float().contiguous() for k, v in prm.score.state_dict().items()}
    quantized = getattr(_backbone(prm).config, "quantization_config", None) is not None
    save_file(head, str(out / HEAD_FILE), metadata={"format": "pt", "step_tag": step_tag,
                                                    "qlora": str(int(quantized))})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_prm(path, precision: str = "fp32", attn_implementation: str = "auto", base=None,
             trust_remote_code: bool = False):
    """(prm, tokenizer, step_tag) from an exported folder: merged (save_prm) or adapter form (save_adapter).

    base overrides the adapter's recorded base folder (e.g. after moving it). A QLoRA adapter goes on the
    base quantized again (deterministic), precision being its compute dtype.
    """
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        if not (p / HEAD_FILE).is_file():
            raise ModelError(f"{p} has a PEFT adapter but no {HEAD_FILE} (the PRM head): "
                                    "write adapters with dreamprm.model.save_adapter")
        with safe_open(str(p / HEAD_FILE), "pt") as sf:
            meta = sf.metadata() or {}
        step_tag = meta.get("step_tag", DEFAULT_STEP_TAG)
        base_dir = check_model_dir(base or json.loads((p / "adapter_config.json").read_text())
                                   ["base_model_name_or_path"])
        prm, _ = _load(base_dir, precision, attn_implementation, trust_remote_code, meta.get("qlora") == "1",
                       want_head=False)
        prm.score.load_state_dict(load_file(str(p / HEAD_FILE), device=str(prm.score[0].weight.device)))
        has_tok = (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()
        tok = load_tokenizer(p if has_tok else base_dir, step_tag, trust_remote_code)
        grow_embeddings(prm.model, tok, base_dir)  # the rows training added (mean init), before the adapter
        prm.model = _peft_wrap(PeftModel.from_pretrained, prm.model, str(p), is_trainable=False)
    else:
        p = check_model_dir(p)
        step_tag = json.loads((p / "config.json").read_text()).get("dreamprm_step_tag", DEFAULT_STEP_TAG)
        tok = load_tokenizer(p, step_tag, trust_remote_code)
        prm, has_head = _load(p, precision, attn_implementation, trust_remote_code, False)
        if not has_head:
            raise ModelError(f"{p} is not a PRM folder (no score.0/score.2 weights); build_prm makes a PRM "
                             "from a causal-LM folder")
    return prm.eval(), tok, step_tag
