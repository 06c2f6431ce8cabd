"""Adapter files: save / load (self-contained, fingerprinted), PEFT export, atomic writes.

An adapter directory holds

    adapter_config.json      {"format": "pissa-adapter", "version": 2, "config": AdapterConfig,
                              "layers": {name: {"in", "out", "base_digest", "residual_digest"}},
                              "base_fingerprint", "residual_fingerprint"}
    adapter.safetensors      {name}.lora_A (r, in), {name}.lora_B (out, r)   trained factors
                             {name}.A0 (r, in),     {name}.B0 (out, r)       initial factors
                             {name}.lora_core, {name}.core0 ((r,) or (r, r)) methods with a core
                             {name}.Ar (r, in),     {name}.Br (out, r)       QPiSSA residual factors

A layer's entry in "layers" also records ``train`` (its trainable parts) and ``orthonormal``
(absent in older files: A and B train, no core).

The initial factors rebuild the residual ``W - s * B0 @ A0`` bit-exactly from the original
base weights (the same :func:`~pissa.decompose.residual_of` as at attach), so no residual
model needs to be stored; a QPiSSA layer rebuilds its 4-bit residual ``nf4(W - s * Br @ Ar)``
from its residual factors instead (files without them load as before). No pickle anywhere; every
file and directory appears atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pissa.errors import PissaError
from pissa.files.atomic import atomic_dir
from pissa.files.digests import model_fingerprint

FORMAT = "pissa-adapter"
VERSION = 2
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"
"""Trainable parameters outside the adapters (a classifier head), when the model has any."""


def write_adapter(
    path: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    meta: dict[str, dict[str, Any]],
    head: dict[str, Tensor] | None = None,
    num_labels: int | None = None,
    base: dict[str, str] | None = None,
) -> Path:
    """Write an adapter directory from the :func:`layer_entry` parts of its layers (save_adapter, ``pissa init``).

    ``head``: trained parameters outside the adapters (``HEAD_FILE``, listed under "head"), with
    the classifier's ``num_labels``; ``base``: ``{"model": name or path, "kind": head}`` of the base.
    """
    doc = adapter_doc(config, meta, head, num_labels, base)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        if head:
            save_file(head, str(tmp / HEAD_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return Path(path)


def adapter_doc(
    config: dict[str, Any],
    meta: dict[str, dict[str, Any]],
    head: dict[str, Tensor] | None = None,
    num_labels: int | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``CONFIG_FILE`` document of an adapter: config, the base it was made from, per-layer entries and fingerprints."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": dict(config),
        "layers": meta,
        "base_fingerprint": model_fingerprint({n: m["base_digest"] for n, m in meta.items()}),
        "residual_fingerprint": model_fingerprint({n: m["residual_digest"] for n, m in meta.items()}),
    }
    if base:
        doc["base_model"] = base
    if head:
        doc["head"] = sorted(head)
        doc["num_labels"] = num_labels
    return doc


def read_adapter_doc(path: str | os.PathLike) -> dict[str, Any]:
    """The validated config document (``CONFIG_FILE``) of an adapter directory."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise PissaError(f"{path} is not a pissa adapter directory (needs {CONFIG_FILE} and {TENSORS_FILE}); "
                         "pass the folder save_adapter wrote")
    try:
        doc = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise PissaError(f"{path / CONFIG_FILE} is not valid JSON ({e}); re-save the adapter") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise PissaError(f"{path} has format {doc.get('format')!r} v{doc.get('version')}; this pissa reads {FORMAT} v{VERSION}")
    return doc


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config document and tensors of an adapter directory, validated."""
    doc = read_adapter_doc(path)
    try:
        tensors = load_file(str(Path(path) / TENSORS_FILE))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise PissaError(f"{Path(path) / TENSORS_FILE} cannot be read ({e}); re-save the adapter") from None
    return doc, tensors


def base_description(doc: dict[str, Any]) -> str:
    """The base an adapter document records, for messages: ``smollm2 (causal-lm, fingerprint ...)``."""
    base = doc.get("base_model") or {}
    name = base.get("model", "the model it was created from")
    kind = f"{base['kind']}, " if base.get("kind") else ""
    return f"{name} ({kind}fingerprint {doc['base_fingerprint']})"


class RecordedBase(NamedTuple):
    """How to load the base of an adapter (:func:`recorded_base`)."""

    model: str
    kind: str
    num_labels: int | None
    dtype: torch.dtype
    """The dtype the base weights had (their digests cover it): load the base in it, then convert if need be."""


def recorded_base(path: str | os.PathLike, model: str | None, kind: str) -> RecordedBase:
    """How to load the base of the adapter at ``path``: the given model / kind, else the ones the
    adapter records, and the dtype of its base weights; a PissaError when neither names a model."""
    doc = read_adapter_doc(path)
    base = doc.get("base_model") or {}
    model = model or base.get("model")
    if model is None:
        raise PissaError(f"the adapter at {path} does not record its base model; pass `model`")
    if kind == "auto":
        kind = base.get("kind") or "auto"
    return RecordedBase(model, kind, doc.get("num_labels"), _base_dtype(doc))


def _base_dtype(doc: dict[str, Any]) -> torch.dtype:
    """The base weights' dtype an adapter document records (float32 for adapters that predate the record)."""
    first: dict[str, Any] = next(iter(doc["layers"].values()), {})
    return getattr(torch, first.get("base_dtype", "float32"))
