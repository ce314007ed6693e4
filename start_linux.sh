#!/usr/bin/env bash
# One-click install and launch of Hearth.
#   ./start_linux.sh                 install what is missing, then serve the UI with the default model
#   ./start_linux.sh --install-only  everything but the launch
#   ./start_linux.sh [app flags]     flags after the script name go to `python app.py serve`
# Re-running is fast: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

INSTALL_ONLY=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--install-only" ]; then INSTALL_ONLY=1; else ARGS+=("$a"); fi
done

PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "[hearth] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch: a CUDA build where an NVIDIA GPU answers nvidia-smi, otherwise the CPU build.
# HEARTH_TORCH_INDEX names a wheel index to take torch from (e.g. PyTorch's CPU-only index).
# The installed version read from its metadata: importing torch to ask would cost seconds at every start.
if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('torch').startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[hearth] NVIDIA GPU found: installing torch $TORCH_VERSION (CUDA build)"
  else
    echo "[hearth] no NVIDIA GPU: installing torch $TORCH_VERSION (CPU build)"
  fi
  "$VPY" -m pip install --quiet ${HEARTH_TORCH_INDEX:+--index-url "$HEARTH_TORCH_INDEX"} "torch==$TORCH_VERSION"
fi

# Python requirements: reinstalled only when requirements.txt changed since the last successful install.
STAMP="$VENV/.requirements.sha256"
WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[hearth] installing requirements.txt"
  "$VPY" -m pip install --quiet -r requirements.txt "torch==$TORCH_VERSION"
  echo "$WANT" > "$STAMP"
fi

# llama-cpp-python, the GGUF runtime, is compiled from source (minutes; pip's wheel cache makes a rebuild take
# seconds) and never rebuilt once the pinned version is installed. A launch does not wait for it: it builds in
# the background, niced, while the UI comes up (the Model tab shows its state; GGUF models run on Hearth's
# engine until it is ready). --install-only (what ./run_tests.sh runs) builds it in the foreground.
if [ "$INSTALL_ONLY" = 1 ]; then
  "$VPY" -m loaders.llamacpp_install build \
    || echo "[hearth] llama-cpp-python did not build: GGUF models run on Hearth's engine ($("$VPY" -m loaders.llamacpp_install state))"
elif ! "$VPY" -m loaders.llamacpp_install state >/dev/null; then
  echo "[hearth] building llama-cpp-python in the background (the Model tab shows its progress)"
  nohup nice -n 10 "$VPY" -m loaders.llamacpp_install build >/dev/null 2>&1 &
fi

export GRADIO_ANALYTICS_ENABLED=False
export HF_HUB_DISABLE_TELEMETRY=1
if [ "$INSTALL_ONLY" = 1 ]; then
  "$VPY" app.py install-default-model
  echo "[hearth] installed. Launch with ./start_linux.sh"
  exit 0
fi
# No install step here: the UI comes up first, and the start-up load installs the default model if it is missing.
exec "$VPY" app.py serve --model SmolLM2-135M-Instruct ${ARGS[@]+"${ARGS[@]}"}
