"""`dreamprm export RUN_DIR OUT_DIR`: a servable Hugging Face folder from a training run.

    dreamprm export runs/prm exported/prm                        # merged, latest complete checkpoint
    dreamprm export runs/prm exported/prm-adapter --adapter      # PEFT adapter + head (LoRA / QLoRA runs)
    dreamprm export runs/prm exported/prm-500 --checkpoint step_00000500

Merged (default): the Qwen2ForProcessRewardModel layout written by model.save_prm (config.json with
that architecture for Qwen2 backbones and the step tag, model.safetensors with model.* and score.0/2,
tokenizer files), LoRA merged and 4-bit weights dequantized; modeling_dreamprm.py and the config's
auto_map let AutoModel.from_pretrained(OUT, trust_remote_code=True) load it with its head.
--adapter: model.save_adapter (PEFT adapter_config.json / adapter_model.safetensors on the base
folder named in it, head in score.safetensors). Both come from the checkpoint's consolidated fp32 state dict
(engine.consolidated_state_dict), so ZeRO-3 runs export whole tensors, never the empty shards of
peft #453 / trl #4416; a LoRA checkpoint without its base is rebuilt on the base folder it trained on,
refused when that folder's files differ from the fingerprint the checkpoint records. dreamprm.json
records where the export came from and how to tokenize for it (step tag, chat template, prompt
profiles); dreamprm.scoring.load_scorer reads it. A merged export also gets README.md (usage_card): how to
score it with load_scorer, transformers and vLLM, which reads the step tag id only when it is passed
(PoolerConfig(step_tag_id=N)).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from dreamprm.checkpoint import AtomicFolder, fsync_dir, shared_state, write_atomic, write_json_atomic
from dreamprm.errors import DreamPRMError


def export(run_dir, out_dir, adapter: bool = False, checkpoint: str | None = None,
           precision: str = "fp32") -> Path:
    """Write the export of a run (or of one checkpoint folder) to out_dir; returns out_dir.

    Raises scoring.ScoringError naming what is missing for an incomplete run or a partial checkpoint,
    and before any loading for an out_dir that is not empty or an --adapter export of a full fine-tune.
    """
    from dreamprm.model import save_adapter, save_prm  # torch and transformers: not for `dreamprm --help`
    from dreamprm.scoring import EXPORT_INFO, ScoringError, load_checkpoint_prm, path_kind, resolve_checkpoint

    src, out = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    if path_kind(src) == "model":
        raise ScoringError(f"{src} is a model folder (config.json) already; export takes a run directory or "
                           "a checkpoint folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScoringError(f"OUT_DIR {out} exists and is not empty; remove it or choose another")
    ckpt = resolve_checkpoint(src, checkpoint)
    state = shared_state(ckpt)
    cfg = state["config"]
    mode = cfg["model"]["mode"]
    if adapter and mode == "full":
        raise ScoringError(f"--adapter needs a LoRA or QLoRA run; {ckpt} is a full fine-tune (model.mode full): "
                           "export it merged (without --adapter)")
    prm, tok, _ = load_checkpoint_prm(ckpt, precision)
    tag = cfg["model"]["step_tag"]
    with AtomicFolder(out) as tmp:  # the export appears whole or not at all (out is empty: checked above)
        if adapter:
            save_adapter(prm, tmp, tok, tag)
        else:
            save_prm(prm, tmp, tok, tag, merge_lora=True)
        info = {"format": 1, "form": "adapter" if adapter else "merged", "step_tag": tag,
                "chat_template": cfg["model"]["chat_template"], "max_length": cfg["data"]["max_length"],
                "mode": mode, "precision": precision if mode != "qlora" else cfg["train"]["precision"],
                "checkpoint": str(ckpt.resolve()), "step": state["step"], "config": cfg,
                "profile": cfg.get("data", {}).get("profile", "default"), "profiles": state.get("profiles")}
        write_json_atomic(tmp / EXPORT_INFO, info)
        if not adapter:
            conf = json.loads((tmp / "config.json").read_text())
            write_atomic(tmp / CARD, usage_card(out.resolve(), conf, info, tok))
        seal(tmp)
    return out


def seal(folder: Path) -> None:
    """Before the export folder is renamed into place: every file durable (fsync) and with the usual
    permissions (0666 and folders 0777, less the umask: writers such as safetensors create 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
            continue
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(p, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)
    fsync_dir(folder)


CARD = "README.md"  # the merged export's usage file (a model card)
VLLM_DEFAULT_TAG_ID = 151651  # the id vLLM looks for without a step_tag_id: the released Qwen2.5-Math-PRM's


def usage_card(out: Path, conf: dict, info: dict, tokenizer) -> str:
    """The merged export's README.md: how to build its input and score it with dreamprm, plain transformers
    and vLLM, with this export's step tag, token id and prompt filled in, so its snippets run as they are.

    out: where the export ends up; conf: its config.json; info: its dreamprm.json.
    """
    from dreamprm.data.tokenize import PROFILES, QUESTION
    from dreamprm.model import PRM_ARCH
    from dreamprm.scoring import pick_profile

    tag, tid = info["step_tag"], conf["dreamprm_step_tag_id"]
    prof = pick_profile(info.get("profiles"), info.get("profile"), None, out) or PROFILES["default"]
    chat = bool(info["chat_template"] and prof.chat and getattr(tokenizer, "chat_template", None))
    dtype = str(conf.get("dtype", "float32"))
    lit = functools.partial(json.dumps, ensure_ascii=False)  # a str as a Python literal, in double quotes
    content = "question" if prof.template == QUESTION else f"{lit(prof.template)}.replace({lit(QUESTION)}, question)"
    if chat:
        msgs = ([f'        {{"role": "system", "content": {lit(prof.system)}}},\n'] if prof.system else []) + [
            f'        {{"role": "user", "content": {content}}},\n']
        prompt = (f"    messages = [\n{''.join(msgs)}    ]\n"
                  "    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)\n"
                  "    ids = tok(prompt, add_special_tokens=False).input_ids  # the template holds any BOS\n")
        how = "the tokenizer's chat template (system and user message, generation prompt)"
    else:
        prompt = f"    ids = tok({content} + \"\\n\").input_ids  # with the tokenizer's special tokens\n"
        how = "the question and a newline, no chat template"
    lines = [
        "# dreamprm process reward model",
        "",
        f"Exported by `dreamprm export` from `{info['checkpoint']}` (update {info['step']}, {info['mode']} "
        f"fine-tune, {dtype} weights). A backbone plus a 2-class head: P(step correct) = softmax(logits)[1] at "
        "the step tag placed after each step.",
        "",
        f"- step tag: `{tag}`, token id **{tid}** (`dreamprm_step_tag_id` in config.json)",
        f"- prompt: {how}; prompt profile `{prof.name}`",
        f"- longest solution trained on: {info['max_length']} tokens",
        "",
        "## Input",
        "",
        "The prompt, then every step followed by the step tag, each step tokenized on its own (as in training; "
        "a step must not contain the tag):",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        "",
        f"MODEL = {lit(str(out))}  # this folder",
        f"STEP_TAG_ID = {tid}  # {tag}",
        "tok = AutoTokenizer.from_pretrained(MODEL)",
        "",
        "",
        "def prm_input(question, steps):",
        prompt.rstrip("\n"),
        "    for step in steps:",
        "        ids += tok(step, add_special_tokens=False).input_ids + [STEP_TAG_ID]",
        "    return ids",
        "```",
        "",
        "## dreamprm",
        "",
        "```python",
        "from dreamprm.scoring import load_scorer",
        "",
        "scorer = load_scorer(MODEL)            # builds the input itself",
        "scorer.score(question, steps)          # [P(step 1 correct), ...]",
        "```",
        "",
        "## transformers",
        "",
    ]
    if "auto_map" in conf:
        lines += [
            "```python",
            "import torch",
            "from transformers import AutoModel",
            "",
            f"model = AutoModel.from_pretrained(MODEL, trust_remote_code=True, dtype=torch.{dtype}).eval()",
            "model.step_scores(torch.tensor([prm_input(question, steps)]))[0]   # [P(step 1 correct), ...]",
            "```",
            "",
            "Without `trust_remote_code` the head is dropped (AutoModel) or replaced by a random one "
            "(AutoModelForTokenClassification).",
        ]
    else:
        lines += ["This backbone has no class transformers exports by name: load the folder with dreamprm."]
    lines += ["", "## vLLM", ""]
    if conf.get("architectures") == [PRM_ARCH]:
        lines += [
            f"vLLM does not read `dreamprm_step_tag_id`: pass the id, or it looks for id {VLLM_DEFAULT_TAG_ID} "
            "(the released Qwen2.5-Math-PRM's) and returns an empty result for every prompt, without a warning.",
            "",
            "```python",
            "from vllm import LLM",
            "from vllm.config import PoolerConfig",
            "",
            f'llm = LLM(model=MODEL, runner="pooling", dtype="{dtype}", '
            f"pooler_config=PoolerConfig(step_tag_id={tid}))",
            '(out,) = llm.encode([{"prompt_token_ids": prm_input(question, steps)}], pooling_task="token_classify")',
            "out.outputs.data[:, 1].tolist()        # [P(step 1 correct), ...]",
            "```",
            "",
            f"Per request instead: `llm.encode(..., pooling_params=PoolingParams(step_tag_id={tid}))` (`from vllm "
            f"import PoolingParams`). Served: "
            f"`vllm serve {out} --runner pooling --dtype {dtype} --pooler-config "
            f"'{json.dumps({'step_tag_id': tid})}'`.",
        ]
    else:
        lines += [f"Not servable as a PRM: vLLM's PRM class is {PRM_ARCH} (Qwen2 backbones only)."]
    return "\n".join(lines) + "\n"


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a Hugging Face PRM folder (merged or adapter) from a run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (its latest complete checkpoint is "
                   "exported) or a checkpoint folder RUN_DIR/checkpoints/step_N")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist, or be empty)")
    p.add_argument("--adapter", action="store_true",
                   help="write the PEFT adapter and the head instead of merged weights (LoRA / QLoRA runs)")
    p.add_argument("--checkpoint", metavar="step_N",
                   help="export this checkpoint of RUN_DIR instead of the latest (step_00000500, or 500)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the exported weights (default %(default)s; QLoRA runs use their training "
                        "precision)")
    p.set_defaults(handler=run_export)
    return p


def run_export(args) -> int:
    """CLI handler: 0 on success, 1 with the reason on stderr."""
    from dreamprm.scoring import EXPORT_INFO  # torch: not for `dreamprm --help`

    try:
        out = export(args.run_dir, args.out_dir, args.adapter, args.checkpoint, args.precision)
    except DreamPRMError as e:
        print(f"dreamprm export: {e}", file=sys.stderr)
        return 1
    info = json.loads((out / EXPORT_INFO).read_text())
    files = ", ".join(sorted(f.name for f in out.iterdir()))
    print(f"exported step {info['step']} of {info['checkpoint']} ({info['mode']}, {info['form']}) to {out}: "
          f"{files}")
    return 0
