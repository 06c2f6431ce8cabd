"""The residual quantizers by name (``AdapterConfig.quantize``): each a pure round trip ``X -> dq(q(X))``.

- ``"nf4"``: 4-bit NormalFloat in blocks of 64 (QLoRA; :mod:`pissa.methods.nf4`), 0.5625 bytes per weight;
- ``"int8"``: LLM.int8's 8-bit rows with 16-bit outlier columns (:mod:`pissa.methods.int8`), about 1 byte per weight.

QPiSSA's iterations (:func:`pissa.methods.qpissa.refine`) and the error analysis take one of these
functions; the frozen residual layers that store the codes are in :mod:`pissa.adapter.quantized`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pissa.errors import PissaError
from pissa.methods.int8 import int8, require_int8
from pissa.methods.nf4 import nf4, require_bnb

Quantizer = Callable[[Tensor], Tensor]
"""``q(X (..., m, n)) -> dq(q(X))`` of each matrix, in X's dtype."""

QUANTIZERS: dict[str, Quantizer] = {"nf4": nf4, "int8": int8}
"""The quantizers by name."""

QUANT_TYPES: tuple[str, ...] = tuple(QUANTIZERS)


def quantizer(kind: str) -> Quantizer:
    """The round trip of ``kind``, or a PissaError naming the choices."""
    if kind not in QUANTIZERS:
        raise PissaError(f"unsupported quantize={kind!r}; use one of: {', '.join(QUANT_TYPES)}")
    return QUANTIZERS[kind]


def check_quantizable(kind: str) -> None:
    """Raise PissaError unless ``kind`` names a quantizer and bitsandbytes provides it here."""
    quantizer(kind)
    if kind == "int8":
        require_int8()
    else:
        require_bnb()
