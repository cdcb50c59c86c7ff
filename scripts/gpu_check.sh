#!/usr/bin/env bash
# Issue 39's GPU measurements in one command, on one H100/H200 with PyTorch installed and nothing
# downloaded (about 5-6 minutes). The machine has only what is copied to it, so the data and the
# yardstick are arguments:
#
#   bash scripts/gpu_check.sh DATA YARDSTICK [WHEELS]
#
# DATA       a directory holding cifar-10-batches-bin/, or the shared cifar10-jpeg75.tar.gz with
#            cifar10_from_jpeg.py beside it (decoded here, ~10 s)
# YARDSTICK  airbench94_muon_gpu.py (the shared copy of the GPU record script)
# WHEELS     optional: a directory of wheels to install tqdm, pyyaml and tensorboard from, offline,
#            where the machine lacks them
#
# Prints one table (and writes it to gpu_check/results.md, with every command's log beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 VGGTRAIN_ALLOCATOR=system
PY=${PYTHON:-python3}
if ! "$PY" -c "import tqdm, yaml, tensorboard" 2>/dev/null; then
  if [ $# -ge 3 ]; then
    "$PY" -m pip install -q --no-index --find-links "$3" tqdm pyyaml tensorboard
  else
    echo "gpu_check: this Python lacks tqdm, pyyaml or tensorboard; pass a wheels directory (see above)" >&2
    exit 2
  fi
fi
exec "$PY" scripts/gpu_check.py "$1" "$2"
