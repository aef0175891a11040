"""Scoring refuses an index made with another model or tokenizer than the one scoring it.

The fingerprints compared are those the Logger records in the manifest (`model.fingerprint`:
architecture config and logged weights, engines/fingerprint.py; `metadata.tokenizer`), computed
the same way for the live model. A part missing on either side (FSDP1 weights, an API user who
gave no tokenizer) is not compared. `allow_model_mismatch=True` (`--allow-model-mismatch`) lets a
deliberate cross-model use through with a warning; the mismatch is then recorded in the results.
"""

from __future__ import annotations

import warnings
from typing import Any

from logra_dist.engines.fingerprint import model_fingerprint
from logra_dist.index.format import IndexFormatError

ALLOW_FLAG = "--allow-model-mismatch (Scorer(..., allow_model_mismatch=True))"


def identity_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """{field: value} of the model and tokenizer fingerprints an index's manifest records."""
    fp = (manifest.get("model") or {}).get("fingerprint") or {}
    return {
        "model.fingerprint.config": fp.get("config"),
        "model.fingerprint.weights": fp.get("weights"),
        "metadata.tokenizer": (manifest.get("metadata") or {}).get("tokenizer"),
    }


def live_identity(fingerprint: dict[str, Any] | None, tokenizer: str | None) -> dict[str, Any]:
    fp = fingerprint or {}
    return {
        "model.fingerprint.config": fp.get("config"),
        "model.fingerprint.weights": fp.get("weights"),
        "metadata.tokenizer": tokenizer,
    }


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {
        k: (ours[k], theirs[k])
        for k in ours
        if ours[k] is not None and theirs.get(k) is not None and ours[k] != theirs[k]
    }


def check_identity(
    where: str, index: dict[str, Any], other: dict[str, Any], other_name: str, allow: bool
) -> dict[str, Any] | None:
    """Refuse (or, with allow, warn about) fields that differ between the index's identity and
    `other` (the scoring model's, or a query index's). Returns the mismatch to record, or None."""
    diff = differences(index, other)
    if not diff:
        return None
    named = "; ".join(f"field {k!r} is {a!r} in the index, {b!r} for {other_name}" for k, (a, b) in diff.items())
    if not allow:
        raise IndexFormatError(
            f"{where}: the index was made with another model or tokenizer: {named}. Score with the "
            f"model and tokenizer the index was logged with, or pass {ALLOW_FLAG} for deliberate "
            "cross-model use (e.g. a fine-tuned checkpoint)"
        )
    warnings.warn(f"{where}: scoring across models as allowed: {named}", RuntimeWarning, stacklevel=3)
    return {k: {"index": a, other_name: b} for k, (a, b) in diff.items()}


def check_scoring_model(store, session, tokenizer: str | None, allow: bool) -> dict[str, Any] | None:
    """The Scorer's check of its model (collective with a model: every rank fingerprints its
    slice of the weights, one small all-reduce) and tokenizer fingerprint against the index."""
    if session is None and tokenizer is None:
        return None
    where = str(store.root / "manifest.json")
    try:
        if session is not None and not allow:
            recorded = recorded_model_dtype(store.manifest)
            fix = (
                f"load the model in {recorded} (the engine's bf16/fp16 switch, --dtype {recorded}, or "
                f"model.to(torch.{recorded})), or pass {ALLOW_FLAG} to score across precisions"
            )
            live_dtype = str(session.engine.compute_dtype).removeprefix("torch.")
            check_model_dtype(where, recorded, live_dtype, "the scoring model computes in", fix)
        live = model_fingerprint(session.engine.root, session._modules) if session is not None else None
        return check_identity(
            where,
            identity_of(store.manifest),
            live_identity(live, tokenizer),
            "the scoring model",
            allow,
        )
    except IndexFormatError:
        if session is not None:
            session.close()  # leave the user's model as it was: no hooks, weights unfrozen
        raise


def check_query_index(store, queries, allow: bool) -> dict[str, Any] | None:
    """A query index must come from the index's model and tokenizer too."""
    where = f"{queries.root / 'manifest.json'} (query index)"
    if not allow:
        recorded = recorded_model_dtype(store.manifest)
        fix = f"log the queries again with --dtype {recorded}, or pass {ALLOW_FLAG}"
        other = recorded_model_dtype(queries.manifest)
        check_model_dtype(str(store.root / "manifest.json"), recorded, other, f"query index {queries.root} is", fix)
    return check_identity(where, identity_of(store.manifest), identity_of(queries.manifest), "the query index", allow)


def recorded_model_dtype(manifest: dict[str, Any]) -> str | None:
    """The dtype an index's gradients were computed in: the Logger's `metadata.precision.model`,
    else the CLI's `data.model_dtype` / `metadata.dtype`; None for an index that predates them."""
    meta = manifest.get("metadata") or {}
    return (
        (meta.get("precision") or {}).get("model")
        or (manifest.get("data") or {}).get("model_dtype")
        or meta.get("dtype")
    )


def check_model_dtype(where: str, index_dtype: str | None, other: str | None, other_name: str, fix: str) -> None:
    """Query gradients must be made in the precision the training gradients were: a bf16 index
    scored with fp32 query gradients (or the reverse) gives plausible but shifted scores."""
    if index_dtype is not None and other is not None and index_dtype != other:
        raise IndexFormatError(
            f"{where}: the index was logged in {index_dtype} (manifest metadata.precision.model) but "
            f"{other_name} {other}; {fix}"
        )
