"""Cached default checkpoint and a generic local-checkpoint loader.

The default model is trained once per machine on first use and cached, with a
file lock so concurrent ranks of a distributed job train it only once.
Loading goes through ``AutoModelForCausalLM``/``AutoTokenizer`` so it is the
same path as any user-supplied local Hugging Face checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from logra_dist.config import default_cache_dir  # re-exported by logra_dist.embedded
from logra_dist.embedded.corpus import corpus_sha256
from logra_dist.embedded.model import MARKER, train_default_model

DEFAULT_MODEL_SUBDIR = "default-model-v1"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", MARKER)


def _is_complete(path: Path) -> bool:
    if not all((path / name).is_file() for name in _REQUIRED):
        return False
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("corpus_sha256") == corpus_sha256()


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return ``<cache_dir>/default-model-v1``, training the default model there if missing.

    ``cache_dir`` defaults to :func:`default_cache_dir`. Safe to call from
    several processes at once: an exclusive ``flock`` on a sibling lock file
    lets exactly one process train while the others wait, then all return.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / DEFAULT_MODEL_SUBDIR
    if _is_complete(path):
        return path
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{DEFAULT_MODEL_SUBDIR}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not _is_complete(path):  # another process may have finished meanwhile
                train_default_model(path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return path


def load_model_and_tokenizer(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any local HF causal-LM checkpoint directory (no network), model in eval mode.

    If the tokenizer has no pad token (common for Llama), its eos token is used.
    """
    path = Path(path).expanduser()
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{dtype_kw: dtype})
    model.eval()
    return model, load_tokenizer(path)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (no network); its eos token pads if it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(Path(path).expanduser(), local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
