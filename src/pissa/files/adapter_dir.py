"""Adapter files: save / load (self-contained, fingerprinted), PEFT export, atomic writes.

An adapter directory holds

    README.md                its model card (pissa.files.card; not covered by the digests below)
    adapter_config.json      {"format": "pissa-adapter", "version": 2, "config": AdapterConfig,
                              "layers": {name: {"in", "out", "base_digest", "residual_digest"}},
                              "base_fingerprint", "residual_fingerprint",
                              "training": {"data", "steps", "lr", "eval_before", "eval_after", "command"}
                              (a run's adapter only)}
    adapter.safetensors      {name}.{tensor} for every tensor of each adapted layer's shape, e.g. the low-rank
                             {name}.lora_A (r, in), {name}.lora_B (out, r)   trained factors
                             {name}.A0 (r, in),     {name}.B0 (out, r)       initial factors
                             {name}.lora_core, {name}.core0 ((r,) or (r, r)) methods with a core
                             {name}.Ar (r, in),     {name}.Br (out, r)       QPiSSA residual factors

A layer's entry in "layers" also records its ``shape`` (:mod:`pissa.adapter.shapes`; tensor names never
contain a dot), ``train`` (its trainable tensors), ``rank`` and ``facts`` (the shape's; older files have none
of these: low-rank, A and B train, ``orthonormal`` instead of facts). This module reads and writes the
tensors by layer without knowing what they are.

The frozen tensors rebuild the residual (low-rank: ``W - s * B0 @ A0``) bit-exactly from the original
base weights (the same formula as at attach), so no residual model needs to be stored; a QPiSSA layer
rebuilds its 4-bit residual ``nf4(W - s * Br @ Ar)`` from its residual factors. No pickle anywhere; every
file and directory appears atomically.

Integrity: the document's ``"integrity"`` entry records what the folder held when it was written,

    "integrity": {"algorithm": "xxh3-128",
                  "tensors": {"adapter.safetensors": digest, "head.safetensors": digest (when present)},
                  "config": digest}

each tensor file's :func:`~pissa.files.digests.tensors_digest` (every tensor's name, dtype, shape and bytes)
and the :func:`~pissa.files.digests.doc_digest` of the document without that entry. :class:`AdapterFiles`
(the one reader: ``load_adapter``, the streamed merge and ``load_sharded`` all open folders through it)
refuses a folder whose tensors or config disagree with it, in one line naming the file. Folders written
before the entry existed (no ``"integrity"``) are read with the checks they always had (headers, byte
ranges, the base digests): accepted, unverified; saving them again adds the entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from pissa.errors import PissaError
from pissa.files.atomic import atomic_dir
from pissa.files.card import CARD_FILE, TRAINING, adapter_card
from pissa.files.digests import ALGORITHM, doc_digest, model_fingerprint, tensors_digest
from pissa.files.safetensors import Entry, read_tensor, shard_entries

FORMAT = "pissa-adapter"
VERSION = 2
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"
"""Trainable parameters outside the adapters (a classifier head), when the model has any."""
INTEGRITY = "integrity"
"""The document's entry of digests (see the module docstring)."""

def layer_of(key: str) -> tuple[str, str]:
    """``(layer, tensor)`` of a key ``{layer}.{tensor}`` in ``TENSORS_FILE`` (tensor names have no dot)."""
    layer, _, tensor = key.rpartition(".")
    return layer, tensor


def write_adapter(
    path: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    meta: dict[str, dict[str, Any]],
    head: dict[str, Tensor] | None = None,
    num_labels: int | None = None,
    base: dict[str, str] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter directory from the :func:`layer_entry` parts of its layers (save_adapter, ``pissa init``).

    ``head``: trained parameters outside the adapters (``HEAD_FILE``, listed under "head"), with
    the classifier's ``num_labels``; ``base``: ``{"model": name or path, "kind": head}`` of the base;
    ``training``: the run that trained it (:func:`~pissa.files.card.training_record`), for its model card.
    """
    doc = adapter_doc(config, meta, head, num_labels, base, training)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        if head:
            save_file(head, str(tmp / HEAD_FILE), metadata={"format": FORMAT})
        write_config(tmp, doc)
    return Path(path)


def write_config(folder: Path, doc: dict[str, Any]) -> None:
    """Write ``CONFIG_FILE`` into the (temporary) adapter folder ``folder`` once its tensor files are there:
    ``doc`` with the ``"integrity"`` digests of those files and of ``doc`` itself added; and its model card
    (``README.md``, :func:`~pissa.files.card.adapter_card`, outside the digests)."""
    doc = json.loads(json.dumps(doc))  # the document as it reads back (tuples as lists), for its digest
    files = [TENSORS_FILE] + ([HEAD_FILE] if doc.get("head") else [])
    digests = {name: tensors_digest(folder / name, _entries(folder, name)) for name in files}
    doc[INTEGRITY] = {"algorithm": ALGORITHM, "tensors": digests, "config": doc_digest(doc)}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    (folder / CARD_FILE).write_text(adapter_card(doc), encoding="utf-8")


def adapter_doc(
    config: dict[str, Any],
    meta: dict[str, dict[str, Any]],
    head: dict[str, Tensor] | None = None,
    num_labels: int | None = None,
    base: dict[str, str] | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``CONFIG_FILE`` document of an adapter: config, the base it was made from, per-layer entries and fingerprints
    (and the run that trained it, ``training``, when one did)."""
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
    if training:
        doc[TRAINING] = training
    return doc


def read_adapter_doc(path: str | os.PathLike) -> dict[str, Any]:
    """The validated config document (``CONFIG_FILE``) of an adapter directory; one whose recorded config
    digest disagrees with it (edited or damaged after it was saved) raises PissaError."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise PissaError(f"{path} is not a pissa adapter directory (needs {CONFIG_FILE} and {TENSORS_FILE}); "
                         "pass the folder save_adapter wrote")
    try:
        doc = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PissaError(f"{path / CONFIG_FILE} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        found = (doc.get("format"), doc.get("version")) if isinstance(doc, dict) else (None, None)
        raise PissaError(f"{path} has format {found[0]!r} v{found[1]}; this pissa reads {FORMAT} v{VERSION}")
    if INTEGRITY in doc:
        recorded = doc[INTEGRITY]
        if not isinstance(recorded, dict) or not isinstance(recorded.get("tensors"), dict):
            raise PissaError(f"{CONFIG_FILE} in {path} has a malformed {INTEGRITY!r} entry; restore the file or re-save "
                             "the adapter")
        if recorded.get("config") != doc_digest({k: v for k, v in doc.items() if k != INTEGRITY}):
            raise PissaError(f"{CONFIG_FILE} in {path} does not match the digest it records (edited or damaged after "
                             "it was saved); restore the file or re-save the adapter (its tensors belong to the recorded config)")
    return doc


class AdapterFiles:
    """An adapter directory opened for reading: its validated document (:func:`read_adapter_doc`) and tensor
    headers, checked against the recorded ``"integrity"`` digests (each file streamed in 16 MiB pieces) when
    it has them; tensors are read on demand, a layer at a time (:meth:`layer`), with plain reads.

    Raises PissaError, naming the file, for a missing, truncated, corrupt or changed file, or a layer without
    tensors.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.doc = read_adapter_doc(self.path)
        self.layers: dict[str, dict[str, Any]] = self.doc["layers"]
        self.entries = _entries(self.path, TENSORS_FILE)
        self.layer_keys: dict[str, list[str]] = {name: [] for name in self.layers}
        for key in self.entries:
            if (owner := layer_of(key)[0]) in self.layer_keys:
                self.layer_keys[owner].append(key)
        if missing := [name for name, keys in self.layer_keys.items() if not keys]:
            raise PissaError(f"{self.path / TENSORS_FILE} has no tensors of layer {missing[0]}; re-save the adapter")
        self.head_names: list[str] = list(self.doc.get("head") or [])
        self.head_entries: dict[str, Entry] = {}
        if self.head_names:
            if not (self.path / HEAD_FILE).is_file():
                raise PissaError(f"{self.path / HEAD_FILE} is missing (the adapter lists head parameters); re-save the adapter")
            self.head_entries = _entries(self.path, HEAD_FILE)
            if missing := [n for n in self.head_names if n not in self.head_entries]:
                raise PissaError(f"{self.path / HEAD_FILE} lacks the head parameter {missing[0]!r}; re-save the adapter")
        if INTEGRITY in self.doc:
            self._verify()

    def _verify(self) -> None:
        recorded = self.doc[INTEGRITY]["tensors"]
        for name, entries in [(TENSORS_FILE, self.entries)] + ([(HEAD_FILE, self.head_entries)] if self.head_names else []):
            if recorded.get(name) != tensors_digest(self.path / name, entries):
                raise PissaError(f"{name} in {self.path} does not match the digest its {CONFIG_FILE} records (changed "
                                 "or damaged after it was saved); re-save the adapter or restore the file")

    def layer(self, name: str) -> dict[str, Tensor]:
        """Layer ``name``'s tensors by their names, read from the file now."""
        with open(self.path / TENSORS_FILE, "rb", buffering=0) as f:
            return {layer_of(k)[1]: read_tensor(f, self.entries[k]) for k in self.layer_keys[name]}

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of ``TENSORS_FILE`` by its key ``{name}.{tensor}``."""
        with open(self.path / TENSORS_FILE, "rb", buffering=0) as f:
            return {k: read_tensor(f, e) for k, e in self.entries.items()}

    def head(self) -> dict[str, Tensor]:
        """The saved head parameters (a classifier head: small); empty when there are none."""
        if not self.head_names:
            return {}
        with open(self.path / HEAD_FILE, "rb", buffering=0) as f:
            return {n: read_tensor(f, self.head_entries[n]) for n in self.head_names}


def _entries(folder: Path, name: str) -> dict[str, Entry]:
    """The checked header of tensor file ``name`` in an adapter folder; PissaError naming it if unreadable."""
    path = folder / name
    return shard_entries(path, f"{path} cannot be read ({{}}); re-save the adapter")


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
