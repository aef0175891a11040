"""Layer types LoGra can log, one small handler class each, registered by subclassing.

A handler says which modules it takes, their widths (from module attributes, never
`weight.shape`: ZeRO-3 empties it outside the forward) and how a layer input becomes the
(B, T, k_in) projected activations; the output side is the same for every type (P_out g_t).
The logged block is always  G~ = sum_t (P_out g_t)(P_in a_t)^T  (k_out x k_in), with a_t the
d_in-vector that multiplies the weight; how G~ relates to the gradient of the weight *as stored*
is documented per handler (tests compare against exactly that).

Adding a type is one subclass here with a `name`; `LoGraConfig.layer_types` selects among them
(its list of known names, `config.LAYER_TYPES`, must equal `LAYER_TYPES.names()`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from logra_dist.registry import Registry

LAYER_TYPES: Registry[LayerHandler] = Registry("layer type")


class LayerHandler:
    """One logged module: widths, token shape, and the input-side projection."""

    name: ClassVar[str]
    # Whether the weight is stored (d_in, d_out), i.e. transposed against G = sum_t g_t a_t^T
    # (d_out x d_in): per-weight tensors such as Adam's second moment are oriented by it.
    weight_transposed: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        LAYER_TYPES.register(cls)

    def __init__(self, module: nn.Module):
        self.module = module

    @staticmethod
    def matches(module: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def d_in(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def d_out(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_shape(self, x: torch.Tensor) -> torch.Size | None:
        """The (batch, tokens) shape of an input, matched against the attention mask; None when
        the input has no token axis (then the mask does not apply)."""
        return x.shape[:-1] if x.dim() >= 3 else None

    def project_input(self, x: torch.Tensor, p_in: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, T, k_in) projected activations in `dtype`; p_in None = identity (full rank)."""
        x = x.detach()
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x if x.dtype == dtype else x.to(dtype)
        return x if p_in is None else x @ p_in.T


class Linear(LayerHandler):
    """nn.Linear, y = x W^T + b with W (d_out x d_in): the block is P_out G P_in^T with
    G = dL/dW as stored."""

    name = "linear"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @property
    def d_in(self) -> int:
        return int(self.module.in_features)

    @property
    def d_out(self) -> int:
        return int(self.module.out_features)


class Conv1D(LayerHandler):
    """transformers' GPT-2 Conv1D, y = x W + b with W stored transposed (nx, nf) = (d_in, d_out):
    the block is P_out G^T P_in^T with G = dL/dW as stored. Recognized by class name, so
    transformers is never imported."""

    name = "conv1d"
    weight_transposed = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")

    @property
    def d_in(self) -> int:
        return int(self.module.nx)

    @property
    def d_out(self) -> int:
        return int(self.module.nf)


class Embedding(LayerHandler):
    """nn.Embedding, y_t = W[idx_t] with W (num_embeddings x dim) = (d_in x d_out): a Linear layer
    on one-hot inputs, so G = sum_t g_t e_{idx_t}^T (d_out x d_in) and the block is
    P_out G P_in^T = sum_t (P_out g_t)(P_in[:, idx_t])^T, i.e. P_out (dL/dW)^T P_in^T with W as
    stored. The input side is a gather of P_in's columns, never a one-hot matmul (full rank, the
    user's choice for a vocabulary-wide layer, does build the one-hot rows).
    Tokens equal to `padding_idx` get no gradient in torch; their input side is zeroed to match
    (token statistics count them like any token with a zero input)."""

    name = "embedding"
    weight_transposed = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @property
    def d_in(self) -> int:
        return int(self.module.num_embeddings)

    @property
    def d_out(self) -> int:
        return int(self.module.embedding_dim)

    def token_shape(self, x: torch.Tensor) -> torch.Size | None:
        return x.shape if x.dim() >= 2 else None

    def project_input(self, x: torch.Tensor, p_in: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        idx = x.detach().reshape(x.shape[0], -1)
        if p_in is None:
            px = nn.functional.one_hot(idx, self.d_in).to(dtype)
        else:
            px = p_in.T[idx]
            px = px if px.dtype == dtype else px.to(dtype)
        pad = self.module.padding_idx
        if pad is not None:
            px = px * (idx != pad).unsqueeze(-1).to(dtype)
        return px


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the first registered type that takes `module` (a module's type does not
    depend on which types a config logs), or None."""
    for name in LAYER_TYPES.names():
        cls = LAYER_TYPES.get(name)
        if cls.matches(module):
            return cls(module)
    return None
