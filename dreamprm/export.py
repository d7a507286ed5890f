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
profiles); dreamprm.scoring.load_scorer reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreamprm.checkpoint import AtomicFolder, shared_state, write_json_atomic
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
    return out


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
