"""Typed, validated configuration, checked once at the edge and stored with every index.

Every shard, `stats.h5` and `manifest.json` carries the config as JSON, so an index can be
re-opened, compared against another index, or scored, without the original command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INITS = ("random", "pca", "identity")
HESSIANS = ("raw", "kfac", "ekfac", "none")
FISHERS = ("empirical", "true", "exact", "model")
MODEL_FISHERS = ("true", "exact", "model")  # statistics from the model's own predictive distribution (statistics_pass)
SAMPLED_FISHERS = ("true", "model")  # the kinds that may draw fisher_samples labels
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8", "int4", "sign")
SCORE_MODES = ("dot", "relatif", "cosine")
COMPUTE_DTYPES = ("float32", "float64")
# Names of core.layers.LAYER_TYPES (config cannot import core; a test keeps the two equal).
LAYER_TYPES = ("linear", "conv1d", "embedding")
DEFAULT_LAYER_TYPES = ("linear", "conv1d")

# Named recipes for `LoGraConfig.from_preset`: the fields each sets (the rest keep their defaults).
# "accurate" is the best single recipe measured at k=32 on BOTH benchmarks (docs/evaluation.md;
# bench/results/accuracy/lm.json and digits.json, 2026-12-02): random projections (PCA adds a pass
# and loses on digits), the raw projected Fisher of the MODEL's predictive distribution (fisher
# "model": the exact expectation over a classifier's classes, 8 labels drawn per token for a
# language model; the digits classifier's Fisher sampled even 64 times is far noisier than exact:
# 0.616 vs 0.662 at their best dampings), damping 0.01: the LM is best at 0.001-0.01, digits at
# 0.1-0.3, and 0.01 is the one value at which both beat every peer's tuned LDS in the mean.
# Chosen on the same test queries as the peers' "best". A new recipe or field is one entry here.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {},
    "accurate": {"hessian": "raw", "fisher": "model", "fisher_samples": 8, "damping": 0.01},
}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the allowed values."""


@dataclass
class LoGraConfig:
    """What to log and how.

    k_in / k_out: projection rank on the input (activation) and output (gradient) side of every
    layer. A layer narrower than a rank gets its own width on that side (a 10-class head at k=16
    logs a 16 x 10 block): the layout records each layer's ranks, so nothing is hidden.
    ranks: per-layer overrides {regex: [k_in, k_out]}, matched (re.search) against layer names in
    order, the first match wins; still capped at the layer's widths. A pattern that matches no
    logged layer is an error (a typo would otherwise silently log the default ranks). Held (and
    stored) as an ordered list of [regex, k_in, k_out]: JSON files of an index sort dict keys,
    which would change which pattern is first.
    init: "random" (Gaussian, seeded from `seed` and the layer name: no broadcast needed),
    "pca" (top eigenvectors of the KFAC factors; needs a statistics pass) or "identity"
    (full rank, exact gradients: for tests and tiny models).
    hessian: "raw" projected empirical Fisher per layer ((k_in k_out)^2), "kfac" (two small
    factors per layer), "ekfac" (KFAC's eigenbases, eigenvalues re-fitted on the per-sample
    rows; keeps raw's Fisher while logging) or "none" (plain gradient dot products).
    fisher: "empirical" (statistics from the logged rows, data labels), "true" (from a
    `statistics_pass()` with `fisher_samples` labels per token drawn from the model), "exact"
    (the expectation over a classifier's classes, sum_c p_c g_c g_c^T: the Gauss-Newton matrix)
    or "model" (the model Fisher by the best estimator the output allows: "exact" when the
    caller gives a class count, else "true" with `fisher_samples`; `Logger.fisher_targets`
    resolves it and records which one ran). `core.fisher.FisherTargets` builds the expanded
    batch. Rows always keep the data's labels.
    damping: lambda = damping x mean eigenvalue of each layer's matrix (1.0 as in the paper).
    include / exclude: regular expressions matched (re.search) against module names.
    storage_dtype: the row codec of the shards: "float32", "float16", "bfloat16", or quantized
    per row and layer block "int8", "int4", "sign" (1 bit a value; index/codecs.py). The
    curvature statistics always come from the full-precision rows.
    layer_types: which kinds of module are layers ("linear", "conv1d", "embedding"); by default
    Linear and transformers' Conv1D. "embedding" logs nn.Embedding weights (d_in = vocabulary:
    keep init="identity" and PCA for small vocabularies). Changes the layout, hence the rows.
    optimizer_state: a training checkpoint whose Adam second moments scale every layer's gradient
    (docs/method.md, optimizer-aware gradients); optimizer_state_digest is filled in at attach.
    preset: the name `from_preset` built this config from (PRESETS; recorded, never re-applied).
    """

    k_in: int = 16
    k_out: int = 16
    init: str = "random"
    seed: int = 0
    include: list[str] = field(default_factory=lambda: [r".*"])
    exclude: list[str] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=lambda: list(DEFAULT_LAYER_TYPES))
    storage_dtype: str = "float16"
    hessian: str = "raw"
    fisher: str = "empirical"
    fisher_samples: int = 1
    damping: float = 1.0
    compute_dtype: str = "float32"
    flush_rows: int = 1024
    writer_queue: int = 4
    # Optimizer-aware gradients (core/optimizer.py): the user's optimizer checkpoint (DeepSpeed
    # ZeRO-3 folder, torch.distributed.checkpoint folder, or optimizer.pt) whose Adam second
    # moments scale both sides of every layer; the digest of that scaling is filled in at attach
    # and checked by every later reader (the Scorer), so queries are scaled as the rows were.
    optimizer_state: str | None = None
    optimizer_state_digest: str | None = None
    preset: str | None = None  # the PRESETS name this config was built from (recorded, not re-applied)
    ranks: list[list] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def _normalize_ranks(self) -> None:
        """{regex: [k_in, k_out]} (in order) or tuples -> the stored [[regex, k_in, k_out], ...]."""
        if isinstance(self.ranks, dict):
            self.ranks = [[p, *v] if isinstance(v, (list, tuple)) else [p, v] for p, v in self.ranks.items()]
        if isinstance(self.ranks, tuple):
            self.ranks = list(self.ranks)
        if isinstance(self.ranks, list):
            self.ranks = [list(r) if isinstance(r, (list, tuple)) else r for r in self.ranks]

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"LoGraConfig: {msg}")

        for name in ("k_in", "k_out", "flush_rows", "writer_queue", "fisher_samples"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative int, got {self.seed!r}")
        for name, allowed in (
            ("init", INITS),
            ("hessian", HESSIANS),
            ("fisher", FISHERS),
            ("storage_dtype", STORAGE_DTYPES),
            ("compute_dtype", COMPUTE_DTYPES),
        ):
            value = getattr(self, name)
            need(value in allowed, f"{name}={value!r} is not one of {list(allowed)}")
        need(
            isinstance(self.damping, (int, float)) and self.damping >= 0,
            f"damping must be a non-negative number, got {self.damping!r}",
        )
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            need(
                isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns),
                f"{name} must be a list of regular expressions, got {patterns!r}",
            )
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ConfigError(f"LoGraConfig: {name} pattern {p!r} is not a valid regex: {e}") from e
        need(len(self.include) > 0, "include must name at least one pattern")
        types = self.layer_types
        need(
            isinstance(types, (list, tuple)) and len(types) > 0 and all(isinstance(t, str) for t in types),
            f"layer_types must be a non-empty list of layer type names, got {types!r}",
        )
        unknown = [t for t in types if t not in LAYER_TYPES]
        need(not unknown, f"layer_types {unknown} are not among {list(LAYER_TYPES)}")
        need(len(set(types)) == len(types), f"layer_types {list(types)} names a type twice")
        for name in ("optimizer_state", "optimizer_state_digest"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, str) and value), f"{name} must be a path string, got {value!r}")
        need(
            self.optimizer_state_digest is None or self.optimizer_state is not None,
            "optimizer_state_digest without optimizer_state",
        )
        need(self.preset is None or self.preset in PRESETS, f"preset={self.preset!r} is not one of {list(PRESETS)}")
        self._validate_ranks(need)
        need(
            self.fisher_samples == 1 or self.fisher in SAMPLED_FISHERS,
            f"fisher_samples={self.fisher_samples} is for fisher='true' or 'model' (sampled labels); "
            f"fisher={self.fisher!r} draws none",
        )

    def _validate_ranks(self, need) -> None:
        self._normalize_ranks()  # also when set after construction
        need(
            isinstance(self.ranks, list),
            f"ranks must map layer regexes to [k_in, k_out] ({{regex: [k_in, k_out]}}), got {self.ranks!r}",
        )
        for entry in self.ranks:
            need(
                isinstance(entry, list) and len(entry) >= 1 and isinstance(entry[0], str),
                f"ranks entry {entry!r} must be [regex, k_in, k_out]",
            )
            pattern, value = entry[0], entry[1:]
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"LoGraConfig: ranks pattern {pattern!r} is not a valid regex: {e}") from e
            ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            need(ok, f"ranks[{pattern!r}] must be two positive integers [k_in, k_out], got {value!r}")
        patterns = [e[0] for e in self.ranks]
        need(len(set(patterns)) == len(patterns), f"ranks names a pattern twice: {patterns}")
        need(
            not (self.ranks and self.init == "identity"),
            f"ranks={self.ranks} with init='identity': identity projections are full rank; "
            "drop ranks or use init='random'/'pca'",
        )

    def layer_ranks(self, name: str) -> tuple[int, int] | None:
        """(k_in, k_out) of the first `ranks` pattern matching a layer name, or None."""
        for pattern, k_in, k_out in self.ranks:
            if re.search(pattern, name):
                return k_in, k_out
        return None

    @property
    def row_compatibility_key(self) -> dict[str, Any]:
        """Fields that must agree between shards for their rows to be comparable."""
        fields = ("k_in", "k_out", "init", "seed", "include", "exclude", "ranks", "optimizer_state_digest")
        key = {k: getattr(self, k) for k in fields}
        return {**key, "layer_types": sorted(self.layer_types)}  # a set: the layout is in model order

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoGraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"LoGraConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LoGraConfig:
        """The recipe `name` of PRESETS with `overrides` on top; records the name in `preset`."""
        if name not in PRESETS:
            raise ConfigError(f"LoGraConfig: unknown preset {name!r}; known presets are {list(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides, "preset": name})

    @classmethod
    def from_json(cls, text: str) -> LoGraConfig:
        return cls.from_dict(json.loads(text))


def default_cache_dir() -> Path:
    """``$LOGRA_DIST_HOME`` if set, else ``~/.cache/logra_dist`` (the bundled model, the
    self-influence cache of read-only indexes)."""
    return Path(os.environ.get("LOGRA_DIST_HOME") or "~/.cache/logra_dist").expanduser()
