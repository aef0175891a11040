#!/usr/bin/env bash
# The bench venv for the peers of `python -m logra_dist.eval run --benchmark lm --peers`:
# LogIX (via setup_logix.sh: the same layered venv, bench/.bench-venv), plus Kronfluence 1.0.1
# (EKFAC / KFAC) and TRAK (traker 0.3.2), installed with --no-deps so that nothing in the
# product venv changes; their remaining imports (einconv, opt_einsum for Kronfluence) are added
# the same way, the rest (torch, transformers, accelerate, safetensors, scikit-learn, tqdm) come
# from the product venv. Never in the product's dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup_logix.sh
P="${LOGIX_VENV:-bench/.bench-venv}/bin/python"
"$P" -m pip install -q --no-deps "kronfluence==1.0.1" "traker==0.3.2" einconv opt_einsum
"$P" - <<'PY'
import importlib.metadata as md
from kronfluence.analyzer import Analyzer  # noqa: F401
from trak import TRAKer  # noqa: F401
import logix  # noqa: F401
print("peers ready:", ", ".join(f"{p} {md.version(p)}" for p in ("kronfluence", "traker", "logix-ai")))
PY
