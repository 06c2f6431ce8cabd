"""The models ``pissa pretrain`` trains from scratch: a Llama of a given shape whose decoder linears stay dense
(``full``), or are replaced by LOST's low-rank plus channel-sparse layer (``lost``) or its low-rank part alone
(``low-rank``), each cut from the SVD of the layer's random init (:mod:`pissa.methods.lost`).

The embeddings, the (tied) output head and the norms stay dense in every architecture.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

from pissa.errors import PissaError
from pissa.methods.lost import LostFactors, channel_count, lost_decompose, lost_forward

Architecture = Literal["full", "low-rank", "lost"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


class LostLinear(nn.Module):
    """``y = (x A^T) B^T + x[..., index] values^T (+ bias)``: LOST's layer (:func:`pissa.methods.lost.lost_forward`).

    ``B`` (out, r), ``A`` (r, in) and ``values`` (out, k) train; ``index`` (k,) is a buffer fixed at init (k = 0:
    the low-rank layer alone, no ``values``)."""

    def __init__(self, factors: LostFactors, bias: Tensor | None) -> None:
        super().__init__()
        self.B = nn.Parameter(factors.B.detach().clone())
        self.A = nn.Parameter(factors.A.detach().clone())
        self.register_buffer("index", factors.index.detach().clone())
        self.values = nn.Parameter(factors.values.detach().clone()) if factors.index.numel() else None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = factors.A.shape[1], factors.B.shape[0]
        self.channels = factors.index.numel()

    def factors(self) -> LostFactors:
        index: Tensor = self.index  # type: ignore[assignment]
        values = self.values if self.values is not None else self.B.new_zeros(self.out_features, 0)
        return LostFactors(self.B, self.A, index, values)

    def forward(self, x: Tensor) -> Tensor:
        y = lost_forward(x, self.factors())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.A.shape[0]}, channels={self.channels}"


def decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, layer)`` of every ``nn.Linear`` except the output head (``get_output_embeddings()``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child is not head:
                found.append((parent, name, child))
    return found


@torch.no_grad()
def restructure(model: nn.Module, architecture: str, rank: int, sparse_channels: float) -> nn.Module:
    """Replace ``model``'s decoder linears in place (``full``: none): each ``W`` by :class:`LostLinear` with
    ``lost_decompose(W, rank, k)``, ``k = channel_count(sparse_channels, in)`` for ``lost`` and 0 for ``low-rank``.
    Returns ``model``; PissaError for an unknown architecture or a rank / channel count a layer cannot take."""
    if architecture not in ARCHITECTURES:
        raise PissaError(f"`architecture` must be among {', '.join(ARCHITECTURES)}, got {architecture!r}")
    if architecture == "full":
        return model
    for parent, name, layer in decoder_linears(model):
        k = channel_count(sparse_channels, layer.in_features) if architecture == "lost" else 0
        setattr(parent, name, LostLinear(lost_decompose(layer.weight, rank, k), layer.bias))
    return model


def build_llama(vocab_size: int, layers: int, hidden: int, heads: int, intermediate: int, seq_len: int,
                seed: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (tied embeddings, as SmolLM2; one key-value head per head), drawn
    from ``torch.manual_seed(seed)``; float32. Token ids are the corpus rows' (:mod:`pissa.data.corpus`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seq_len, 128), tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (a tied embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
