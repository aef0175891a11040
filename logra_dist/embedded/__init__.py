"""Embedded default: a tiny Llama and a stdlib-docstring corpus that need no download.

They let the package (and its tests) run end to end offline, through the same
Hugging Face loading path a real local Llama checkpoint uses.
"""

from logra_dist.embedded.cache import default_cache_dir, ensure_default_model, load_model_and_tokenizer, load_tokenizer
from logra_dist.embedded.corpus import CORPUS_PATH, corpus_sha256, load_corpus
from logra_dist.embedded.model import default_model_config, train_default_model
from logra_dist.embedded.tokenizer import build_tokenizer

__all__ = [
    "CORPUS_PATH",
    "build_tokenizer",
    "corpus_sha256",
    "default_cache_dir",
    "default_model_config",
    "ensure_default_model",
    "load_corpus",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "train_default_model",
]
