"""Hooks that turn a layer's activations and output gradients into per-sample projected gradients.

For y = W x with inputs x (B, T, d_in) and output gradients g (B, T, d_out), the projected
per-sample gradient is  G~_b = sum_t (P_out g_bt)(P_in x_bt)^T  (k_out x k_in): one GEMM per
side and one batched GEMM, never the d_out x d_in gradient itself.

The forward hook projects the input at once (only B x T x k_in is kept) and registers a hook on
*that call's* output tensor, so a module used several times in one forward pairs every call with
its own gradient; the per-sample result is the sum over calls, as the weight gradient is.
Under ZeRO-3 and FSDP weights are sharded but activations are not, so this needs no
communication at all. Which modules are layers, and how their inputs are projected, is up to
the handlers of core/layers.py.

Token-flattened layers: MoE blocks (Qwen2-MoE's shared expert and its gate, routers) run their
Linear layers on hidden states flattened to (B*T, d). A 2-D input of exactly B*T rows, with
(B, T) the batch's token shape (the mask's, else the first token-shaped input of the batch), is
reshaped back to (B, T, d), and its output gradient likewise, so its rows are exact per-sample
gradients, padding masked as for any layer. A layer that sees another number of rows (a routed
expert gets a subset of the tokens, in routing order) has no row->sample map here: it is refused,
naming the layer and the `exclude` fix, never attributed to the wrong samples.

Activation checkpointing runs a layer twice per batch, and exactly one of the two calls receives
the gradient. Reentrant checkpointing (DeepSpeed's, `use_reentrant=True`) runs the first pass
under no_grad and recomputes, with the gradient, inside backward; non-reentrant checkpointing
(torch's default, Hugging Face's from v5) runs the first pass with the graph and recomputes inside
backward only to refill saved tensors, whose outputs never get a gradient. So a call under
no_grad is deferred (nothing can reach it), and a call made inside backward is captured only if
it redoes a deferred one: each call the gradient reaches is counted once, in either mode.
A reentrant checkpoint recomputes only if one of its inputs requires grad, and logging freezes
the weights, so the input embeddings' output is given a gradient (as Hugging Face's
`enable_input_require_grads` does, but only while capturing). A deferred call never redone (a
checkpoint cut from the graph, or a forward under no_grad inside capture) is refused at the end
of the batch: its layer's rows would silently miss that call's gradient.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from logra_dist.core.layers import LAYER_TYPES, LayerHandler, handler_for
from logra_dist.core.optimizer import OptimizerScaling
from logra_dist.core.projection import LayerSpec

_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """Whether autograd is executing a backward now (a checkpoint's recomputation runs there).
    Without the probe (another torch) every call counts as a forward: a non-reentrant
    recomputation then leaves its hook without a gradient, which capture refuses, never sums."""
    return _graph_task_id is not None and _graph_task_id() != -1


def checkpointing_modules(root: nn.Module) -> tuple[nn.Module | None, list[nn.Module]]:
    """(the input embeddings, the modules that can checkpoint) of a Hugging Face model: layers
    with a `gradient_checkpointing` switch (transformers >= 4.35 and its older model-level flag);
    (None, []) for any other module."""
    switches = [m for m in root.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    get = getattr(root, "get_input_embeddings", None)
    try:
        embeddings = get() if switches and callable(get) else None
    except NotImplementedError:  # a PreTrainedModel without embeddings
        embeddings = None
    return (embeddings if isinstance(embeddings, nn.Module) else None), switches


_RATE_SUFFIXES = ("dropout", "pdrop", "jitter_noise")  # float attributes a forward applies in train mode


def rate_attributes(module: nn.Module) -> dict[str, float]:
    """The module's own positive float rates that its forward applies when `self.training`: the
    functional dropouts of Hugging Face models (`attention_dropout`, OPT's `dropout`, ...) and
    MoE router jitter (Mixtral's `jitter_noise`)."""
    return {
        k: float(v)
        for k, v in vars(module).items()
        if k.endswith(_RATE_SUFFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    }


def train_mode_effect(module: nn.Module, parent: nn.Module | None = None) -> str | None:
    """What the module does in train mode that makes a sample's gradient a random draw or depend
    on its batch mates, if it is in effect now, else None. An nn.Dropout counts when it or its
    parent trains: Hugging Face's GPT-2 attention passes its dropout's p to the attention kernel
    on its own training flag. Float rates (`rate_attributes`) count on the module's own flag;
    batch normalization (batch statistics) too."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.p <= 0 or not (module.training or (parent is not None and parent.training)):
            return None
        parent_use = ", its parent trains and may apply that p itself (GPT-2's attention does)"
        return f"dropout p={module.p:g}" + ("" if module.training else parent_use)
    if not module.training:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch statistics, which couple the samples of a batch"
    rates = rate_attributes(module)
    return ", ".join(f"{k}={v:g}" for k, v in rates.items()) or None


def find_layers(
    root: nn.Module,
    include: list[str],
    exclude: list[str],
    *,
    layer_types: list[str] | tuple[str, ...],
    canonical_name: Callable[[str], str],
) -> list[tuple[str, str, nn.Module, int, int]]:
    """(name, kind, module, d_in, d_out) of every layer of `layer_types` the patterns select.
    `canonical_name` (the engine's) drops the segments wrappers insert into module names, so
    names, projection seeds and the stored layout are the same under every engine."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    found, seen = [], set()
    for raw_name, module in root.named_modules():
        handler = handler_for(module)
        if handler is None or handler.name not in layer_types or id(module) in seen:
            continue
        name = canonical_name(raw_name)
        if any(p.search(name) for p in inc) and not any(p.search(name) for p in exc):
            seen.add(id(module))
            found.append((name, handler.name, module, handler.d_in, handler.d_out))
    return found


# A layer whose input is one row broadcast over the batch (e.g. GPT-2's position embedding `wpe`
# fed (1, T) position ids) only sees the batch-summed gradient: no per-sample gradient exists.
_SHARED_INPUT_HINT = (
    "; if its input is shared by the whole batch (like a position embedding's), it has no "
    "per-sample gradient: exclude it"
)


def _subset_rows_error(name: str, rows: int, tokens: tuple[int, int], why: str) -> ValueError:
    b, t = tokens
    return ValueError(
        f"layer {name!r} saw {rows} flattened rows but the batch has {b} samples x {t} tokens = {b * t}"
        f"{why}: it runs on a subset of the tokens (a routed MoE expert?), and which sample each row "
        f"came from is not known, so it has no per-sample gradient here. Exclude it: "
        f"LoGraConfig(exclude=[{re.escape(name)!r}]) or --exclude '{re.escape(name)}' (or a pattern "
        f"for all such experts)"
    )


def _with_parents(root: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(name, module, parent) of the modules that can act differently in train mode (dropout,
    batch normalization, float rates), found once: the check per batch reads only their flags."""
    parent_of: dict[int, nn.Module] = {}
    for m in root.modules():
        for child in m.children():
            parent_of.setdefault(id(child), m)
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    return [(n, m, parent_of.get(id(m))) for n, m in root.named_modules() if isinstance(m, kinds) or rate_attributes(m)]


class TokenStatistics:
    """Receiver of per-token projected activations and gradients (KFAC factors, PCA covariances)."""

    def observe(self, name: str, acts: torch.Tensor, grads: torch.Tensor, tokens: float) -> None:  # pragma: no cover
        raise NotImplementedError


class GradientCapture:
    """Owns the hooks of all logged layers and the per-sample projected gradients of one batch."""

    def __init__(
        self,
        specs: list[LayerSpec],
        modules: dict[str, nn.Module],
        projections: dict[str, tuple[torch.Tensor, torch.Tensor]],
        compute_dtype: torch.dtype,
        scaling: OptimizerScaling | None = None,
        root: nn.Module | None = None,
    ):
        """scaling: optimizer-aware gradients (core/optimizer.py), diag(row) G diag(col) per layer:
        folded into P_in / P_out (no extra cost), or multiplied in at full rank. root: the model,
        whose input embeddings get a gradient while it checkpoints (`checkpointing_modules`)."""
        self.specs = specs
        self.scaling = scaling
        self.modules = modules
        self.projections = projections
        self.compute_dtype = compute_dtype
        self.token_stats: TokenStatistics | None = None
        self.want_rows = True
        self._active = False
        self._mask: torch.Tensor | None = None  # the batch's (B, T) attention mask, as given
        self._padded = False  # whether it masks anything out (a mask of ones is not multiplied in)
        self._tokens: tuple[int, int] | None = None  # the batch's (B, T): the mask's, else learned
        self._row_kind: dict[str, str] = {}  # per flat-input layer: its rows are "tokens" or "samples"
        self._deferred: dict[str, int] = {}  # per layer: this batch's calls under no_grad, not yet recomputed
        self.autocast_dtype: torch.dtype | None = None  # the batch's torch.autocast dtype, if it ran under one
        self._pad_gradients: dict[str, torch.Tensor] = {}  # per layer: largest output gradient at a masked token
        self._mask_cache: dict[torch.device, torch.Tensor] = {}
        self._check_cache: dict[torch.device, torch.Tensor] = {}  # per device: `_pad_check`
        # the layers nearest the input and the loss: a padded token's own loss shows in both (the
        # head first), a loss mask given as the mask in the first (prompt tokens feed the rest)
        self._pad_probes = {specs[0].name, specs[-1].name} if specs else set()
        self._blocks: dict[str, torch.Tensor] = {}
        self._pending = 0
        self._anchors: dict[tuple, torch.Tensor] = {}
        self._token_blocks: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.handlers: dict[str, LayerHandler] = {s.name: LAYER_TYPES.get(s.kind)(modules[s.name]) for s in specs}
        self._handles = [modules[s.name].register_forward_hook(self._make_forward_hook(s.name)) for s in specs]
        self._parents = _with_parents(root) if root is not None else []  # (name, module, parent)
        embeddings, self._switches = checkpointing_modules(root) if root is not None else (None, [])
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_hook(self._embeddings_hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _refuse_train_mode_effects(self) -> None:
        """A module in train mode with dropout (or router jitter, or batch statistics) makes every
        row a random draw or a function of its batch, and a query's gradient another: plausible
        scores that no rerun reproduces. Refused per batch, since the mode can change."""
        live = [(n, m, e) for n, m, p in self._parents if (e := train_mode_effect(m, p))]
        if live:
            name, module, effect = live[0]
            more = f" (and {len(live) - 1} more)" if len(live) > 1 else ""
            raise ValueError(
                f"{name!r} ({type(module).__name__}) acts in train mode: {effect}{more}; "
                "the logged gradients would not be each sample's own, reproducible one. Call model.eval() "
                "(engine.eval()) before capturing; to keep layers training for activation checkpointing, set "
                "those rates to 0 (engines.loading.checkpoint_for_logging does it for Hugging Face models)"
            )

    @contextmanager
    def active(self, mask: torch.Tensor | None) -> Iterator[None]:
        self._refuse_train_mode_effects()
        self._active, self._blocks, self._pending = True, {}, 0
        self._token_blocks, self._deferred, self.autocast_dtype, self._pad_gradients = [], {}, None, {}
        self._mask, self._mask_cache, self._check_cache = mask, {}, {}
        self._padded = mask is not None and not bool(mask.all())
        self._tokens = tuple(mask.shape) if mask is not None and mask.dim() == 2 else None
        try:
            yield
        finally:
            self._active, self._mask, self._padded, self._mask_cache = False, None, False, {}
            self._tokens = None

    def _flat_tokens(self, name: str, rows: int) -> tuple[int, int] | None:
        """(B, T) when a flat input's `rows` are the batch's B*T tokens (reshape them back), None
        when they are its samples (or nothing says otherwise); any other count is refused. A layer
        must keep one kind across calls and batches, so a routed expert that happens to get B or
        B*T tokens once is still caught by the next batch that routes it another number."""
        if self._tokens is None:
            return None  # no token axis anywhere in this batch: rows are samples
        b, t = self._tokens
        if (rows == b and t == 1) or rows == 1 < b:
            return None  # one token per sample (both readings agree), or a shared row: rows() decides
        if t == 1 or rows not in (b, b * t):
            raise _subset_rows_error(name, rows, self._tokens, "")
        kind = "tokens" if rows == b * t else "samples"
        if self._row_kind.setdefault(name, kind) != kind:
            raise _subset_rows_error(name, rows, self._tokens, f" (it saw {self._row_kind[name]} before)")
        return (b, t) if kind == "tokens" else None

    @property
    def pending_gradients(self) -> int:
        """Hooked outputs whose gradient has not arrived yet (0 after a complete backward)."""
        return self._pending

    def pad_gradient(self) -> tuple[str, float] | None:
        """(layer, value) of the largest output gradient at a token the batch's attention mask
        excludes (`_pad_check`), or None if all are 0. Nothing attends to a padded token, so it
        gets a gradient only from its own loss: labels left on padding (not -100), or a mask that
        is not the attention mask (a loss mask would drop tokens whose activations reach the loss)."""
        if not self._pad_gradients:
            return None
        names = list(self._pad_gradients)
        device = self._pad_gradients[names[0]].device
        values = torch.stack([self._pad_gradients[n].float().to(device) for n in names]).cpu()  # one sync
        worst = int(values.argmax())
        return (names[worst], float(values[worst])) if values[worst] > 0 else None

    @property
    def unreached_calls(self) -> dict[str, int]:
        """Per layer, this batch's calls under no_grad that no backward recomputed (see the module
        docstring): empty after a complete backward of a correctly checkpointed model."""
        return {name: n for name, n in self._deferred.items() if n}

    def _embeddings_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not self._active or not torch.is_grad_enabled() or output.requires_grad:
            return None
        if not any(m.gradient_checkpointing for m in self._switches):
            return None  # nothing checkpoints: the layers' own anchors suffice, at no extra cost
        return output + self._anchor(output)

    def _as_compute(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, d) view of an output gradient in the compute dtype (no copy if it is)."""
        t = t.detach()
        t = t.reshape(t.shape[0], -1, t.shape[-1])
        return t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    def _scaled(self, name: str, p: torch.Tensor | None, side: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(projection with the side's optimizer scaling folded in, or the scaling to multiply in
        when the projection is the identity (None)); no scaling: (p, None)."""
        if self.scaling is None:
            return p, None
        s = getattr(self.scaling.for_layer(name), side)
        s = s.to(device=p.device if p is not None else s.device, dtype=self.compute_dtype)
        return (None, s) if p is None else (p * s, None)

    def _make_forward_hook(self, name: str) -> Callable:
        p_in, p_out = self.projections[name]  # None = identity (full rank): no d x d matmul
        p_in, s_in = self._scaled(name, p_in, "col")
        p_out, s_out = self._scaled(name, p_out, "row")
        p_out_t = None if p_out is None else p_out.T
        handler = self.handlers[name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            if not self._active or not self._counts(name):
                return None
            x = inputs[0]
            if torch.is_autocast_enabled(x.device.type):  # the layer computed in this dtype, whatever the weights'
                self.autocast_dtype = torch.get_autocast_dtype(x.device.type)
            shape, flat = handler.token_shape(x), None
            if shape is None and x.dim() >= 1:
                flat = self._flat_tokens(name, x.shape[0])
                if flat is not None:  # (B*T, ...) -> (B, T, ...): tokens back to their samples
                    x = x.reshape(*flat, *x.shape[1:])
                    shape = handler.token_shape(x)
            elif shape is not None and self._tokens is None:
                self._tokens = (int(shape[0]), int(shape[1:].numel()))
            mask = self._token_mask(shape, x.device, name)
            px = handler.project_input(x, p_in, self.compute_dtype)
            if s_in is not None:
                px = px * s_in.to(px.device)
            if mask is not None:
                px = px * mask
            returned = None
            if not output.requires_grad:
                # The layer's input carries no gradient (first layers, embeddings, weights frozen):
                # add a zero scalar that requires grad so the output joins the graph. Unlike
                # making the output a leaf, nothing of the output's size is kept as `.grad`.
                output = returned = output + self._anchor(output)
            self._pending += 1
            check = None if mask is None or name not in self._pad_probes else self._pad_check(x.device)
            output.register_hook(self._make_grad_hook(name, px, mask, p_out_t, s_out, flat, check))
            return returned

        return hook

    def _counts(self, name: str) -> bool:
        """Whether this call of layer `name` is the one its gradient reaches (see the module
        docstring on activation checkpointing)."""
        if not torch.is_grad_enabled():
            self._deferred[name] = self._deferred.get(name, 0) + 1
            return False
        if _in_backward():
            if not self._deferred.get(name):
                return False  # a non-reentrant recomputation of a call captured in the forward
            self._deferred[name] -= 1  # a reentrant recomputation: the call the gradient reaches
        return True

    def _anchor(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self._anchors:
            self._anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return self._anchors[key]

    def _token_mask(self, shape: torch.Size | None, device: torch.device, name: str) -> torch.Tensor | None:
        """The batch's (B, T, 1) 0/1 mask in the compute dtype on `device`, built once per batch
        and device; None when there is no padding or the input has no token axis (shape None)."""
        source = self._mask
        if source is None or shape is None:
            return None
        if source.shape != shape:
            hint = _SHARED_INPUT_HINT if shape[0] == 1 < source.shape[0] else ""
            raise ValueError(
                f"layer {name!r}: mask of shape {tuple(source.shape)} does not match the "
                f"activations' (batch, tokens) shape {tuple(shape)}{hint}"
            )
        if not self._padded:
            return None
        mask = self._mask_cache.get(device)
        if mask is None:
            mask = source.reshape(shape[0], -1, 1).to(device=device, dtype=self.compute_dtype)
            self._mask_cache[device] = mask
        return mask

    def _pad_check(self, device: torch.device) -> torch.Tensor:
        """(B, T, 1) 1 at the padded tokens whose output gradient must be 0: every masked token
        except one right before an unmasked one (left padding's last pad predicts the first real
        token under the shifted LM loss; nothing else of a padded token reaches a loss)."""
        check = self._check_cache.get(device)
        if check is None:
            keep = self._mask.reshape(self._mask.shape[0], -1).to(device=device) != 0
            check = ~keep
            check[:, :-1] &= keep[:, 1:].logical_not()
            check = check.unsqueeze(-1).to(self.compute_dtype)
            self._check_cache[device] = check
        return check

    def _make_grad_hook(
        self,
        name: str,
        px: torch.Tensor,
        mask: torch.Tensor | None,
        p_out_t: torch.Tensor | None,
        s_out: torch.Tensor | None = None,
        flat: tuple[int, int] | None = None,
        check: torch.Tensor | None = None,
    ) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            pg = self._as_compute(grad if flat is None else grad.reshape(*flat, grad.shape[-1]))
            if p_out_t is not None:
                pg = pg @ p_out_t
            elif s_out is not None:
                pg = pg * s_out.to(pg.device)
            if check is not None:  # the loss must not depend on padding: see `pad_gradient`
                leak = pg.abs().mul_(check).amax()
                prev = self._pad_gradients.get(name)
                self._pad_gradients[name] = leak if prev is None else torch.maximum(prev, leak)
            if mask is not None and self.token_stats is not None:
                # Rows need the mask on one side only (px is masked: sum_t pg_t (m_t px_t)^T is
                # exact for a 0/1 mask); the gradient covariance needs pg itself masked.
                pg = pg * mask
            if self.want_rows:
                block = torch.bmm(pg.transpose(1, 2), px)  # (B, k_out, k_in)
                prev = self._blocks.get(name)
                self._blocks[name] = block if prev is None else prev + block
            if self.token_stats is not None:
                self._token_blocks.append((name, px, pg, mask))
            self._pending -= 1
            return None

        return hook

    def finite_samples(self, batch_size: int) -> torch.Tensor:
        """(B,) mask of the samples whose captured projections are all finite, for batches that
        feed only statistics (no rows to check), e.g. a PCA pass."""
        keep = None
        for _, px, pg, _ in self._token_blocks:
            ok = torch.isfinite(px).flatten(1).all(1) & torch.isfinite(pg).flatten(1).all(1)
            keep = ok if keep is None else keep & ok
        return torch.ones(batch_size, dtype=torch.bool) if keep is None else keep

    def flush_token_statistics(self, keep: torch.Tensor | None = None) -> None:
        """Feed this batch's per-token projections to `token_stats`, only for samples in `keep`
        (so a sample with non-finite gradients never pollutes KFAC factors or covariances)."""
        if keep is not None and bool(keep.all()):
            keep = None  # the usual case: no copy of every layer's projections
        masked_tokens = None  # every layer's mask is the batch's: count it once
        for name, px, pg, mask in self._token_blocks:
            if keep is not None:
                px, pg = px[keep], pg[keep]
                mask = mask[keep] if mask is not None else None
            if mask is None:
                tokens = float(px.shape[0] * px.shape[1])
            else:
                if masked_tokens is None:
                    masked_tokens = float(mask.sum())
                tokens = masked_tokens
            self.token_stats.observe(name, px.reshape(-1, px.shape[-1]), pg.reshape(-1, pg.shape[-1]), tokens)
        self._token_blocks = []

    def rows(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """(B, D) per-sample projected gradients, layers in layout order; zeros for unused layers."""
        parts = []
        for spec in self.specs:
            block = self._blocks.get(spec.name)
            if block is None:
                block = torch.zeros(batch_size, spec.k_out, spec.k_in, dtype=self.compute_dtype, device=device)
            elif block.shape[0] != batch_size:
                hint = _SHARED_INPUT_HINT if block.shape[0] == 1 else ""
                raise ValueError(
                    f"layer {spec.name!r} saw a batch of {block.shape[0]} samples but "
                    f"capture() was given {batch_size} ids{hint}"
                )
            parts.append(block.reshape(batch_size, -1))
        return torch.cat(parts, dim=1)
