"""What the Logger and the Scorer share: an engine, the selected layers, their projections, hooks,
and the capture/backward protocol that yields per-sample projected-gradient rows."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from logra_dist.config import ConfigError, LoGraConfig
from logra_dist.core.capture import GradientCapture, find_layers
from logra_dist.core.fisher import FisherTargets
from logra_dist.core.layers import LAYER_TYPES
from logra_dist.core.optimizer import OptimizerScaling
from logra_dist.core.projection import LayerSpec, build_projections
from logra_dist.data import Batch, TokenizedSample, batches, summed_lm_loss
from logra_dist.engines import Engine, wrap
from logra_dist.tracking import NULL_TRACKER, NullTracker

Projections = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
RowsCallback = Callable[[torch.Tensor, torch.Tensor], None]  # (ids (B,) int64 on the CPU, rows (B, D))


def select_layers(engine: Engine, config: LoGraConfig) -> tuple[list[LayerSpec], dict[str, torch.nn.Module]]:
    """Layer specs in model order, each with its own ranks (`layer_ranks`)."""
    found = find_layers(
        engine.root,
        config.include,
        config.exclude,
        layer_types=config.layer_types,
        canonical_name=engine.canonical_name,
    )
    if not found:
        names = [n for n, _ in engine.root.named_modules()][:20]
        kinds = "/".join(LAYER_TYPES.get(t).__name__ for t in config.layer_types)  # e.g. Linear/Conv1D
        raise ConfigError(
            f"include={config.include} exclude={config.exclude} select no {kinds} "
            f"layer of {type(engine.root).__name__}; some module names: {names}"
        )
    specs, modules = [], {}
    for name, kind, module, d_in, d_out in found:
        k_in, k_out = layer_ranks(config, name, d_in, d_out)
        specs.append(LayerSpec(name, kind, d_in, d_out, k_in, k_out))
        modules[name] = module
    unused = [p for p, _, _ in config.ranks if not any(re.search(p, s.name) for s in specs)]
    if unused:
        raise ConfigError(
            f"ranks pattern(s) {unused} match no logged layer; logged layers: "
            f"{[s.name for s in specs][:20]} (fix the pattern or drop it)"
        )
    return specs, modules


def layer_ranks(config: LoGraConfig, name: str, d_in: int, d_out: int) -> tuple[int, int]:
    """(k_in, k_out) of a layer: full width for init="identity"; else the first matching `ranks`
    override or the config's k_in/k_out, capped at the layer's widths (a 10-class head at k=16
    gets k_out=10: projecting 10 values onto 16 would only add dependent columns)."""
    if config.init == "identity":
        return d_in, d_out
    k_in, k_out = config.layer_ranks(name) or (config.k_in, config.k_out)
    return min(k_in, d_in), min(k_out, d_out)


def optimizer_scaling(engine: Engine, specs: list[LayerSpec], config: LoGraConfig) -> OptimizerScaling | None:
    """The rank-1 Adam scalings of the logged layers from `config.optimizer_state`, or None.
    A config that already records a digest (an index's, read back by the Scorer) must get the
    same scaling again: a moved, changed or different checkpoint is refused, named."""
    if config.optimizer_state is None:
        return None
    from logra_dist.engines.optimizer_state import OptimizerStateError, model_params, read_second_moments, tied_names

    path, recorded = config.optimizer_state, config.optimizer_state_digest
    try:
        kind, moments = read_second_moments(path, model_params(engine))
    except OptimizerStateError as e:
        if recorded is None:
            raise
        raise ConfigError(
            f"the index was logged with optimizer state {path} (scaling digest {recorded}), which cannot be "
            f"read now ({e}); restore it: queries must be scaled as the rows were"
        ) from e
    oriented, eps, tied = {}, {}, tied_names(engine)
    for spec in specs:
        weight = f"{spec.name}.weight"
        weight = tied.get(weight, weight) if weight not in moments else weight
        if weight not in moments:
            raise ConfigError(
                f"optimizer state {path} ({kind}) has no second moment for {weight!r} (a logged layer); "
                f"it has {sorted(moments)[:6]}...: exclude the layer or use the checkpoint of this model"
            )
        v = moments[weight].v
        v = v.T if LAYER_TYPES.get(spec.kind).weight_transposed else v
        if tuple(v.shape) != (spec.d_out, spec.d_in):
            raise ConfigError(
                f"optimizer state {path}: {weight!r} has shape {tuple(moments[weight].v.shape)}, the "
                f"model's layer is d_out={spec.d_out} x d_in={spec.d_in}: another model's checkpoint"
            )
        oriented[spec.name], eps[spec.name] = v, moments[weight].eps
    scaling = OptimizerScaling.from_second_moments(oriented, eps, source=str(path))
    if recorded is not None and recorded != scaling.digest():
        raise ConfigError(
            f"optimizer state {path} gives scaling digest {scaling.digest()} but the index was logged "
            f"with {recorded}: the checkpoint changed since; restore it (queries must be scaled as the rows were)"
        )
    return scaling


_ATEN_MEAN = 1  # at::Reduction::Mean, saved by every reducing loss's backward node


def refuse_mean_loss(loss: torch.Tensor) -> None:
    """A batch-mean loss (reduction='mean', as a Hugging Face model's `outputs.loss`, or `.mean()`)
    divides each batch's rows by its own token or sample count, so rows of different batches
    would be scaled differently: plausible rankings, silently skewed. Caught at the loss's last op."""
    fn = loss.grad_fn
    if fn is None:
        return
    reduced = getattr(fn, "_saved_reduction", None) == _ATEN_MEAN
    averaged = type(fn).__name__.startswith("MeanBackward") and getattr(fn, "_saved_self_sym_numel", 2) > 1
    if reduced or averaged:
        raise ValueError(
            f"backward(loss): the loss is a mean ({type(fn).__name__}{', reduction=mean' if reduced else ''}; a "
            "Hugging Face model's outputs.loss is one), which divides each batch's rows by its own token or sample "
            "count. Pass the SUM over the batch of per-sample summed losses: reduction='sum', e.g. "
            "logra_dist.data.summed_lm_loss(logits, labels)"
        )


class GradientSession:
    """Attaches hooks to a model or engine and turns each captured batch into (B, D) rows.

    The rows of each batch go to `on_rows(ids, rows)` (the Scorer's query set), or to a
    subclass's `_on_batch` (the Logger's shard writer)."""

    tracker: NullTracker = NULL_TRACKER  # phase timers (logra_dist.tracking); a no-op by default

    def __init__(
        self,
        model_or_engine: Any,
        config: LoGraConfig,
        projections: Projections | None = None,
        *,
        on_rows: RowsCallback | None = None,
        tracker: NullTracker | None = None,
    ):
        config.validate()
        if tracker is not None:
            self.tracker = tracker
        self.config = config
        self._on_rows = on_rows
        self._closed = False
        self.engine = wrap(model_or_engine)
        self.specs, self._modules = select_layers(self.engine, config)
        self.scaling = optimizer_scaling(self.engine, self.specs, config)  # before freeze: which were trained
        if self.scaling is not None:
            self.config = config = dataclasses.replace(config, optimizer_state_digest=self.scaling.digest())
        self.compute_dtype = getattr(torch, config.compute_dtype)
        self.device = self.engine.device
        self.engine.freeze()
        self._capture: GradientCapture | None = None
        self._backward_done = False
        try:
            if projections is None and config.init != "pca":
                projections = self._build_projections()
            if projections is not None:
                self._install(projections)
        except BaseException:
            self.close()  # leave the user's model as it was: weights unfrozen
            raise

    # -- projections ------------------------------------------------------------------------
    def _build_projections(self, covariances=None) -> Projections:
        if self.config.init == "identity":
            return {s.name: (None, None) for s in self.specs}
        return build_projections(
            self.specs, self.config.init, self.config.seed, self.compute_dtype, self.device, covariances
        )

    def _install(self, projections: Projections) -> None:
        """Use these projections (moved to where the activations are, in the compute dtype)."""
        missing = [s.name for s in self.specs if s.name not in projections]
        if missing:
            raise ConfigError(f"no projection for layer(s) {missing[:5]}")
        on_device = lambda p: None if p is None else p.to(self.device, self.compute_dtype)  # noqa: E731
        self.projections = {k: (on_device(a), on_device(b)) for k, (a, b) in projections.items()}
        if self._capture is not None:
            self._capture.remove()
        self._capture = GradientCapture(
            self.specs, self._modules, self.projections, self.compute_dtype, scaling=self.scaling, root=self.engine.root
        )

    def projection(self, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in, P_out) of a layer, as used for its rows (identity materialized on request)."""
        if self._capture is None:
            raise RuntimeError("projections are not built yet: init='pca' needs pca_pass() first")
        if layer_name not in self.projections:
            raise KeyError(f"layer {layer_name!r} is not logged; logged layers: {[s.name for s in self.specs]}")
        spec = next(s for s in self.specs if s.name == layer_name)
        p_in, p_out = self.projections[layer_name]
        eye = lambda d: torch.eye(d, dtype=self.compute_dtype, device=self.device)  # noqa: E731
        return (eye(spec.d_in) if p_in is None else p_in, eye(spec.d_out) if p_out is None else p_out)

    @property
    def model(self):
        """Call this for forward passes while capturing (for DDP/DeepSpeed it bypasses the
        wrapper's gradient-reducing forward; for bare modules and FSDP it is the model itself)."""
        return self.engine.model

    @property
    def width(self) -> int:
        return sum(s.width for s in self.specs)

    # -- the capture protocol ---------------------------------------------------------------
    @contextmanager
    def capture(self, ids, mask: torch.Tensor | None = None) -> Iterator[None]:
        """Capture one batch: run the forward through `self.model` and `self.backward(loss)`
        inside the block, with `loss` the SUM of per-sample losses. ids: global sample ids.
        Empty ids make a shadow batch (any dummy input; nothing recorded) for a rank that ran
        out of data while its ZeRO-3/FSDP peers still step (see `engine.lockstep_batches`)."""
        self._check_capture()
        ids = torch.as_tensor(ids)
        if ids.numel() == 0:  # a shadow batch: see Engine.forward_is_collective
            ids = ids.reshape(0).to(torch.int64)
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"capture(ids): ids must be a 1-D integer tensor of sample ids, got "
                f"shape {tuple(ids.shape)} dtype {ids.dtype}"
            )
        self._backward_done = False
        with self._capture.active(mask):
            yield
            if not self._backward_done:
                raise RuntimeError("capture() block ended without backward(loss)")
            if self._capture.pending_gradients:
                raise RuntimeError(
                    f"{self._capture.pending_gradients} hooked layer outputs received no "
                    "gradient: the loss does not depend on them"
                )
            autocast, dtype = self._capture.autocast_dtype, self.engine.compute_dtype
            if autocast is not None and autocast != dtype:
                raise RuntimeError(
                    f"the forward ran under torch.autocast({autocast}) but the model computes in {dtype}: the rows "
                    f"would be {autocast} gradients recorded as {dtype}, so the index's precision checks could not "
                    f"hold queries to it. Run capture() outside autocast, or load the model in {autocast} (the "
                    "engine's bf16/fp16 switch, --dtype)"
                )
            leak = self._capture.pad_gradient()
            if leak is not None:
                raise ValueError(
                    f"the loss depends on padded tokens: layer {leak[0]!r} has an output gradient of {leak[1]:.3g} at "
                    "a token the mask excludes. Label padding -100 (ignored), and pass capture() the batch's "
                    "attention mask (not a loss mask: prompt tokens count, their activations reach the loss)"
                )
            unreached = self._capture.unreached_calls
            if unreached:
                raise RuntimeError(
                    f"layer(s) {sorted(unreached)[:5]} ran under no_grad in this batch and backward never "
                    "recomputed them, so their gradient is missing from the rows: a reentrant activation "
                    "checkpoint none of whose inputs requires grad (logging freezes the weights; make its "
                    "inputs require grad, or use use_reentrant=False), a forward under torch.no_grad() "
                    "inside capture() (run it outside), or a part the model itself runs without gradient, "
                    "like a frozen vision tower (exclude it: LoGraConfig(exclude=[...]))"
                )
            if len(ids) == 0:  # shadow batch: hooks ran so the engine's collectives matched; keep nothing
                return
            with self.tracker.phase("rows"):
                rows = self._capture.rows(len(ids), self.device)
            with self.tracker.phase("batch-end"):  # Logger: statistics, hand-off to the writer
                self._on_batch(ids.to(torch.int64).cpu(), rows)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward with gradient synchronization disabled and weights frozen."""
        refuse_mean_loss(loss)
        self.engine.backward(loss)
        self._backward_done = True

    def _check_capture(self) -> None:
        """Refuse a capture that cannot record (the Logger checks its phase instead)."""
        if self._closed:
            raise RuntimeError("capture() after close(): the hooks are removed; attach again")
        if self._capture is None:
            raise RuntimeError("projections are not built yet: init='pca' needs pca_pass() first")

    def _on_batch(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        if self._on_rows is None:
            raise RuntimeError("GradientSession(on_rows=None): nothing receives the rows (pass on_rows)")
        self._on_rows(ids, rows)

    def close(self) -> None:
        """Remove hooks and restore the weights' requires_grad."""
        self._closed = True
        if self._capture is not None:
            self._capture.remove()
        self.engine.unfreeze()


# -- the batch loop ------------------------------------------------------------------------------
LossFn = Callable[[Callable, Any], torch.Tensor]  # (session.model, batch on the device) -> summed loss


def lm_loss(model: Callable, batch: Batch) -> torch.Tensor:
    """Forward a `data.Batch` and return the sum over samples of each one's summed token loss."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return summed_lm_loss(out.logits, batch.labels)


def _mask(batch: Any) -> torch.Tensor | None:
    return batch.attention_mask if isinstance(batch, Batch) else batch.get("attention_mask")


def _tokens(batch: Any) -> int:
    mask = _mask(batch)
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Batch):
        return batch.to(device)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_batches(
    session,
    batches: Iterable[tuple[Any, Batch | Mapping[str, Any]]],
    loss_fn: LossFn = lm_loss,
    *,
    count: int | None = None,
    shadow: Batch | Mapping[str, Any] | None = None,
    tracker: NullTracker | None = None,
    before: Callable[[Any, torch.Tensor, Any], None] | None = None,
) -> int:
    """Capture this rank's (ids, batch) pairs in order; returns its token count.

    batch: a `data.Batch` or a mapping of tensors (a collator's output; its "attention_mask", if
    any, masks padding). loss_fn(session.model, batch) runs the forward and returns the SUM of
    per-sample losses. count: number of pairs, when `batches` has no len(). Under ZeRO-3/FSDP every
    forward is collective, so a rank with fewer batches than its peers then runs shadow batches (no
    ids: hooks fire, nothing is recorded) on `shadow` (default: its first batch) until all ranks have
    run the same number (`engine.lockstep_batches`). With a tracker: "forward" (with the loss) and
    "backward" timed, `tracker.step(samples, tokens)` per batch (shadows count none).
    before(session, ids, batch): called before each capture, shadows included (so every rank makes
    the same number of collective forwards): the statistics capture of fisher="true"."""
    tracker = tracker or NULL_TRACKER
    local = len(batches) if count is None else count
    steps = session.engine.lockstep_batches(local)
    done, tokens, empty = 0, 0, torch.zeros(0, dtype=torch.int64)
    for ids, batch in batches:
        if done == local:
            raise ValueError(f"run_batches: count={local} but more batches came")
        shadow = batch if shadow is None else shadow
        if before is not None:
            before(session, torch.as_tensor(ids), batch)
        tokens += _capture_one(session, ids, batch, loss_fn, tracker)
        done += 1
    if done != local:
        raise ValueError(f"run_batches: count={local} but {done} batches came")
    for _ in range(steps - done):
        if shadow is None:
            raise ValueError(
                "run_batches: this rank has no batch but its peers do, and the forward is collective: "
                "pass shadow= (any input batch; it runs with no ids)"
            )
        if before is not None:
            before(session, empty, shadow)
        _capture_one(session, empty, shadow, loss_fn, tracker)
    return tokens


def _capture_one(session, ids: Any, batch: Any, loss_fn: LossFn, tracker: NullTracker) -> int:
    """One batch through capture; its token count (0 for a shadow batch)."""
    ids = torch.as_tensor(ids)
    tokens = _tokens(batch) if ids.numel() else 0  # on the CPU copy: no device sync
    batch = _to(batch, session.device)
    with session.capture(ids, mask=_mask(batch)):
        with tracker.phase("forward"):
            loss = loss_fn(session.model, batch)
        with tracker.phase("backward"):
            session.backward(loss)
    tracker.step(samples=int(ids.numel()), tokens=tokens)
    return tokens


def run_samples(
    session,
    samples: Sequence[TokenizedSample],
    batch_size: int,
    pad_id: int,
    tracker: NullTracker | None = None,
    statistics: FisherTargets | None = None,
) -> int:
    """Tokenized samples in padded batches of batch_size, through `run_batches` with the summed LM
    loss; a rank out of samples runs a two-token shadow batch. Returns this rank's token count.
    statistics (fisher="true"): before each batch, a `statistics_pass()` capture of its
    `statistics.copies` copies with next tokens drawn from the model, seeded by the config seed
    and the batch's first id (a resumed job draws the same labels for the same batches)."""
    shadow = Batch(
        torch.zeros(0, dtype=torch.long),
        torch.full((1, 2), pad_id),
        torch.ones(1, 2, dtype=torch.long),
        torch.full((1, 2), pad_id),
    )
    pairs = ((b.ids, b) for b in batches(samples, batch_size, pad_id))
    count = -(-len(samples) // batch_size)
    before = None if statistics is None else statistics_capture(statistics, tracker or NULL_TRACKER)
    return run_batches(session, pairs, lm_loss, count=count, shadow=shadow, tracker=tracker, before=before)


def statistics_capture(statistics: FisherTargets, tracker: NullTracker):
    """The statistics capture of each batch, timed as the tracker's "statistics" phase (its
    forward and backward over the copies; the logged batch's own are "forward" / "backward")."""

    def before(session, ids: torch.Tensor, batch: Batch) -> None:
        first = int(ids[0]) if ids.numel() else -1
        gen = torch.Generator(device=session.device).manual_seed(session.config.seed * 1_000_003 + first + 1)

        def sampled_loss(model, b: Batch) -> torch.Tensor:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            return summed_lm_loss(logits, statistics.lm_labels(logits, b.labels, gen))

        with session.statistics_pass(), tracker.phase("statistics"):
            _capture_one(session, statistics.expand(ids), statistics.expand_batch(batch), sampled_loss, NULL_TRACKER)

    return before
