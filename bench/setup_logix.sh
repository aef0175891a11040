#!/usr/bin/env bash
# Create bench/.bench-venv: a venv ONLY for the LogIX comparison (bench/logix_compare.py).
# LogIX (PyPI `logix-ai` 0.1.1, the LoGra authors' library) declares Python <3.11 and an
# unpinned torch; the product venv must not carry it. The bench venv is layered on the product
# venv instead of repeating its 1.3 GB install (6.5 min here): it is made by the product venv's
# interpreter (same Python), and one .pth file in it runs `site.addsitedir(<product
# site-packages>)`, so torch, transformers, h5py, numpy and LogIX's own imports (einops, pyyaml,
# tqdm; checked against its sources) come from the product venv, AFTER the bench venv's own
# site-packages. The bench venv holds only logix-ai, installed with --no-deps
# --ignore-requires-python, plus einops/pyyaml/tqdm if the product venv lacks them.
# Product venv: $LOGRA_PRODUCT_PYTHON (bench/run.py passes its own interpreter), else .venv
# (made by `bash .ci/setup`). Idempotent; seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PRODUCT_PY=${LOGRA_PRODUCT_PYTHON:-.venv/bin/python}
VENV=${LOGIX_VENV:-bench/.bench-venv}
if ! "$PRODUCT_PY" -c "import torch, transformers, h5py" 2>/dev/null; then
    echo "setup_logix.sh: $PRODUCT_PY lacks torch/transformers/h5py: run 'bash .ci/setup' first" >&2
    exit 1
fi
PRODUCT_SITE=$("$PRODUCT_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# --without-pip: the bench venv borrows the product venv's pip through the .pth below.
[ -x "$VENV/bin/python" ] || "$PRODUCT_PY" -m venv --without-pip "$VENV"
P="$VENV/bin/python"
BENCH_SITE=$("$P" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$PRODUCT_SITE')" > "$BENCH_SITE/_logra_product_venv.pth"
"$P" -m pip install -q --no-deps --ignore-requires-python "logix-ai==0.1.1"
# pip sees the product venv's packages: this installs nothing where they are already there.
"$P" -m pip install -q --no-deps einops pyyaml tqdm
"$P" - <<PY
import importlib.metadata as md
import logix, torch
assert logix.__file__.startswith("$BENCH_SITE"), logix.__file__
print("bench venv ready: torch", torch.__version__, "| logix-ai", md.version("logix-ai"), "at", "$BENCH_SITE")
PY
