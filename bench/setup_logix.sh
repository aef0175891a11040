#!/usr/bin/env bash
# Create bench/.bench-venv: a venv ONLY for the LogIX comparison (bench/logix_compare.py).
# LogIX (PyPI `logix-ai` 0.1.1, the LoGra authors' library) declares Python <3.11 and an
# unpinned torch; the product venv must not carry it. So: torch pinned FIRST (the CPU build on
# this machine's disk; an unpinned torch would pull several GB of CUDA wheels), then logix-ai
# with --no-deps --ignore-requires-python, then exactly the packages it and the benchmark
# import (checked against its sources: torch, numpy, einops, pyyaml, tqdm; transformers only
# for its HF/Lightning callbacks, which the benchmark does not import), then logra_dist itself
# without deps. Idempotent; about 1-2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOGIX_VENV:-bench/.bench-venv}
TORCH=${LOGRA_TORCH_VERSION:-2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
P="$VENV/bin/python"
"$P" -m pip install -q "torch==$TORCH"
# transformers (the Llama model) and h5py (our store) for the shared benchmark code; torch is
# already satisfied so pip resolves nothing CUDA. Versions as in the product venv.
"$P" -m pip install -q "torch==$TORCH" "transformers==5.24.0" "h5py>=3.8" numpy psutil tqdm pyyaml einops
"$P" -m pip install -q --no-deps --ignore-requires-python "logix-ai==0.1.1"
"$P" -m pip install -q --no-deps -e .
"$P" - <<'PY'
import importlib.metadata as md
import torch, logix, logra_dist
assert torch.__version__.startswith("2."), torch.__version__
print("bench venv ready: torch", torch.__version__, "| logix-ai", md.version("logix-ai"),
      "| logra_dist", logra_dist.__version__)
PY
