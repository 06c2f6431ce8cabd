"""Devices and precision: where a run's tensors live and in which dtypes it computes.

The frozen base (and so the residual) is held in ``--dtype``; the trainable factors stay in
``AdapterConfig.factor_dtype`` (float32 by default), so the optimizer updates full-precision
master weights. With a half-precision base the forward runs under ``torch.autocast`` (the
CPU has a bfloat16 autocast too), so each matmul runs in the half dtype whatever its inputs'
dtypes; float16 adds a gradient scaler (its range is too small for raw gradients).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from pissa.errors import PissaError

DTypeName = Literal["float32", "bfloat16", "float16"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}
"""Dtype names of the options (``--dtype`` takes the first three, ``--factor-dtype`` all four)."""


def resolve_device(name: str) -> torch.device:
    """The device for ``name`` (auto, cpu, cuda, cuda:N or mps): ``auto`` is CUDA when available, else the CPU. Under torchrun a
    device without an index (``auto``, ``cuda``) is this process's GPU, ``cuda:$LOCAL_RANK``.

    Raises PissaError for a device this machine does not have, naming what it has.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PissaError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PissaError(f"`device` {name}: this machine has no CUDA GPU (torch {torch.__version__}); "
                             "use `device` cpu or auto")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise PissaError(f"`device` {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PissaError(f"`device` {name}: MPS is not available here; use `device` cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PissaError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def torch_dtype(name: DTypeName) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name."""
    if name not in DTYPES:
        raise PissaError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for a half-precision base (``torch.autocast`` in ``dtype``); nothing for float32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A gradient scaler for a float16 base (None otherwise: bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward instead of keeping them.

    Hugging Face models only (``gradient_checkpointing_enable``), non-reentrant: it needs no input
    that requires grad (the embeddings are frozen) and works with adapters, DDP and FSDP2.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PissaError(f"{type(model).__name__} does not support gradient checkpointing; drop `gradient_checkpointing`")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
