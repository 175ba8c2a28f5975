#!/usr/bin/env bash
# System packages the tests use: ffmpeg (to make mp3/mp4 test media), real LibriVox speech
# (pocketsphinx-testdata), headless Chromium with its WebDriver (the web demo's browser test) and
# a C++ compiler (qomni's CPU kernels, qomni/cpu_ops). Tests that need them skip with a reason
# when they are missing.
set -euo pipefail
need=()
command -v ffmpeg >/dev/null || need+=(ffmpeg)
[ -d /usr/share/pocketsphinx/test/data/librivox ] || need+=(pocketsphinx-testdata)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v g++ >/dev/null || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "install-test-media: cannot install ${need[*]} (not root, no sudo); those tests will skip" >&2
  exit 0
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
