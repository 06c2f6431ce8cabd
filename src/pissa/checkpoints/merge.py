"""Merging without loading the model: :func:`merge_checkpoint` (on disk, shard by shard) and :func:`merge_state_dict` (in memory).

Every adapted weight W becomes the trained layer's merged weight, bit for bit what :func:`pissa.merge` gives:
:meth:`~pissa.adapter.shapes.Shape.merged` of its residual (low-rank: ``residual + s * B @ core @ A`` in the factors'
dtype, cast to W's dtype), where the residual is :meth:`~pissa.adapter.shapes.Shape.residual` of W (low-rank:
``W - s * B0 @ core0 @ A0``) or W itself when the checkpoint is the residual one ``pissa init`` wrote.
QPiSSA adapters (residual factors Ar, Br) give ``W - s Br Ar + s B A``, the unquantized merge. A Conv2d kernel
``(out, in, kh, kw)`` is merged as its ``(out, in * kh * kw)`` matrix. The weights are
checked against the adapter's recorded digests first, the adapter's files against their own (its
``"integrity"`` entry), and the shards of a residual checkpoint against the digests ``pissa init`` recorded
(:data:`~pissa.files.digests.SHARD_DIGESTS`: one more streamed read of the checkpoint before merging).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pissa.adapter.config import AdapterConfig
from pissa.adapter.shapes import layer_facts
from pissa.checkpoints.architecture import architecture
from pissa.checkpoints.folder import copy_other_files, open_checkpoint, tensor_key
from pissa.checkpoints.init import DECOMPOSABLE
from pissa.errors import PissaError
from pissa.files.adapter_dir import AdapterFiles, base_description
from pissa.files.atomic import atomic_dir
from pissa.files.card import CARD_FILE, merged_card
from pissa.files.digests import check_shards, weight_digest
from pissa.files.safetensors import (
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    Entry,
    Reader,
    header_bytes,
    raw_bytes,
    read_header,
    write_all,
)


class _Adapter(AdapterFiles):
    """An adapter directory opened for streaming (:class:`~pissa.files.adapter_dir.AdapterFiles`: validated and
    checked against its digests; tensors read a layer at a time), with its AdapterConfig."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.config = AdapterConfig.from_dict(self.doc["config"])

    def wrong_base(self, name: str) -> PissaError:
        return PissaError(
            f"adapter at {self.path} was made from a different base model (weights of {name!r} differ from both its "
            f"base and its residual digests); merge it onto {base_description(self.doc)}"
        )


def _layer_keys(adapter: _Adapter, keys: dict[str, Any], where: str, prefix: str | None = None) -> dict[str, str]:
    """``{layer name: weight key}`` for every adapted layer (see :func:`tensor_key`); PissaError naming a missing one."""
    found = {}
    for name in adapter.layers:
        key = tensor_key(f"{name}.weight", keys, prefix)
        if key is None:
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: {where} has no weight {name}.weight for layer {name!r}"
            )
        found[name] = key
    return found


def _layouts(adapter: _Adapter, shapes: dict[str, tuple[int, ...]], conv1d: bool | dict[str, bool] | None) -> dict[str, bool]:
    """Whether each layer's weight is stored (in, out) (Hugging Face Conv1D) rather than (out, in) (or as a Conv2d
    kernel ``(out, in, kh, kw)``, never Conv1D).

    ``conv1d``: True/False for every layer, or per layer (from the model's modules); otherwise the
    stored shape tells unless the weight is square, and a square one follows the others (Conv1D if
    any layer is, the usual nn.Linear otherwise).
    """
    known: dict[str, bool] = {}
    for name, meta in adapter.layers.items():
        shape, dense = shapes[name], (meta["out"], meta["in"])
        if len(shape) == 4 and (shape[0], shape[1] * shape[2] * shape[3]) == dense:  # a Conv2d kernel (out, in, kh, kw)
            known[name] = False
            continue
        if len(shape) != 2 or shape not in (dense, dense[::-1]):
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: layer {name!r} has shape {list(shape)}, "
                f"the adapter {list(dense)}"
            )
        if isinstance(conv1d, bool):
            known[name] = conv1d
        elif isinstance(conv1d, dict) and name in conv1d:
            known[name] = conv1d[name]
        elif dense[0] != dense[1]:
            known[name] = shape != dense
    square = any(known.values())
    layouts = {name: known.get(name, square) for name in adapter.layers}
    for name, meta in adapter.layers.items():
        if len(shapes[name]) == 2 and shapes[name] != ((meta["in"], meta["out"]) if layouts[name] else (meta["out"], meta["in"])):
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: layer {name!r} has shape {list(shapes[name])}"
            )
    return layouts


def _merged_weight(
    stored: Tensor, conv1d: bool, tensors: dict[str, Tensor], meta: dict[str, Any], scaling: float,
) -> Tensor | None:
    """The trained layer's merged weight in ``stored``'s layout and dtype (see the module docstring);
    None when ``stored`` has neither digest (not the weight the adapter was made from).

    ``stored`` may be the base weight W or the residual ``pissa init`` wrote in its place; ``tensors`` and ``meta``
    are the layer's in the adapter. The residual is the one attach or load_adapter builds and the merge the
    shape's, as in :meth:`pissa.adapter.layer.PissaLinear.merged`, so the result is bit-identical to ``pissa.merge``.
    """
    digest = weight_digest(stored)
    W = stored.T if conv1d else stored.flatten(1)
    shape = layer_facts(meta, tensors)[0]
    t = {k: v.to(W.device) for k, v in tensors.items()}
    if digest == meta["residual_digest"]:
        residual = W
    elif digest == meta["base_digest"]:
        residual = shape.residual(W, t, scaling)  # QPiSSA: the dense residual its 4-bit one is quantized from
    else:
        return None
    merged = shape.merged(residual, t, scaling)
    return merged.T.contiguous() if conv1d else merged.reshape(stored.shape)


def _merge_layer(adapter: _Adapter, name: str, stored: Tensor, conv1d: bool) -> Tensor:
    """The merged weight of layer ``name``, in ``stored``'s dtype. An adapter made on a base of
    another dtype (a bfloat16 run on a float32 checkpoint) merges the weight rounded to that dtype,
    as the trained model held it, and the result is stored back in the checkpoint's dtype."""
    meta = adapter.layers[name]
    made_on = getattr(torch, meta.get("base_dtype", "float32"))
    tensors = adapter.layer(name)
    rank = layer_facts(meta, tensors, f"adapter at {adapter.path} ({name})")[2]
    merged = _merged_weight(stored.to(made_on), conv1d, tensors, meta, adapter.config.scaling_for(rank))
    if merged is None:
        raise adapter.wrong_base(name)
    return merged.to(stored.dtype)


def _head_plan(
    adapter: _Adapter, keys: dict[str, Any], shapes: dict[str, tuple[int, ...]], prefix: str | None = None
) -> tuple[dict[str, str], list[str]]:
    """Where the head parameters go: ``({key: name} replacing a tensor of the base, [names added])``."""
    replace, add = {}, []
    for name in adapter.head_names:
        key = tensor_key(name, keys, prefix)
        if key is None:
            add.append(name)
            continue
        saved = adapter.head_entries[name].shape
        if tuple(shapes[key]) != saved:
            raise PissaError(
                f"adapter at {adapter.path} has a head parameter {name!r} of shape {list(saved)}, the model's {key} is "
                f"{list(shapes[key])}; merge onto a model with the same head (num_labels {adapter.doc.get('num_labels')})"
            )
        replace[key] = name
    return replace, add


def merge_state_dict(
    state_dict: dict[str, Tensor], adapter_dir: str | os.PathLike, *, conv1d: bool | None = None
) -> dict[str, Tensor]:
    """The trained model's state dict: ``state_dict`` (the base model's, or the residual model's that
    ``pissa init`` wrote) with the adapter at ``adapter_dir`` merged in; ``state_dict`` is left unchanged.

    Each adapted layer's weight becomes its merged weight (see the module docstring; the same
    tensors as :func:`pissa.merge`), in the weight's dtype, device and stored layout; the adapter's
    head parameters (a trained classifier) replace the ones in ``state_dict`` (cast to their dtype)
    or are added under their names. Every other entry is the same tensor object as in
    ``state_dict``. The weights must be the ones the adapter was made from (its recorded digests),
    else PissaError. ``conv1d``: whether the weights are stored (in, out) as Hugging Face Conv1D
    (GPT-2); None: told by the shapes (only an adapter whose weights are all square needs it).
    """
    adapter = _Adapter(adapter_dir)
    keys = _layer_keys(adapter, state_dict, "the state dict")
    layouts = _layouts(adapter, {n: tuple(state_dict[k].shape) for n, k in keys.items()}, conv1d)
    replace, add = _head_plan(adapter, state_dict, {k: tuple(t.shape) for k, t in state_dict.items()})
    out = dict(state_dict)
    with torch.no_grad():
        for name, key in keys.items():
            out[key] = _merge_layer(adapter, name, state_dict[key].detach(), layouts[name])
        head = adapter.head()
        for key, name in replace.items():
            out[key] = head[name].to(device=state_dict[key].device, dtype=state_dict[key].dtype)
        for name in add:
            out[name] = head[name]
    return out


def _merge_shard(
    src: Path,
    dst: Path,
    entries: dict[str, Entry],
    work: dict[str, Callable[[Tensor], Tensor] | Tensor],
    added: dict[str, Tensor],
    reader: Reader,
    bar: tqdm,
) -> int:
    """Write shard ``src`` (its tensors: ``entries``) to ``dst`` tensor by tensor: ``work[key]`` maps a
    tensor to what replaces it, or is the replacement; ``added`` tensors are appended. Returns the bytes added."""
    raw, header = read_header(src)
    data = src.stat().st_size - len(raw)
    grown = 0
    if added:
        header, at = dict(header), data
        for key, t in added.items():
            n = t.numel() * t.element_size()
            header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
            at, grown = at + n, grown + n
        raw = header_bytes(header)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        write_all(fout, raw)
        for key, e in sorted(entries.items(), key=lambda kv: kv[1].start):
            job = work.get(key)
            if job is None:
                reader.copy(fin, fout, e.start, e.end, drop=True)
            else:
                new = job if isinstance(job, Tensor) else job(reader.tensor(fin, e, drop=True))
                if new.dtype != TORCH_DTYPES.get(e.dtype) or tuple(new.shape) != e.shape:
                    raise RuntimeError(f"internal error: {key} would change from {e.dtype} {list(e.shape)}")
                write_all(fout, raw_bytes(new))
                del new
            bar.update(e.end - e.start)
        for t in added.values():
            write_all(fout, raw_bytes(t))
    if dst.stat().st_size != len(raw) + data + grown:
        raise RuntimeError(f"internal error: {dst.name} has the wrong size")
    return grown


def _classifier_config(config: dict[str, Any], adapter: _Adapter) -> dict[str, Any]:
    """config.json for a merged model whose adapter trained a classifier head: its labels and architecture."""
    num_labels, kind = adapter.doc.get("num_labels"), (adapter.doc.get("base_model") or {}).get("kind")
    config = dict(config)
    if num_labels and len(config.get("id2label") or {}) != num_labels:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    arch = _sequence_classifier(config.get("model_type")) if kind == "seq-cls" else None
    if arch is not None:
        config["architectures"] = [arch]
    return config


def _sequence_classifier(model_type: str | None) -> str | None:
    """transformers' sequence-classification class name for ``model_type`` (e.g. LlamaForSequenceClassification)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    except ImportError:
        return None
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type) if model_type else None


def merge_checkpoint(
    model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Write the trained model's merged checkpoint to ``out_dir``, streaming ``model_dir`` shard by shard.

    ``model_dir``: the safetensors checkpoint the adapter was made from (single file or shards plus
    index), or the residual checkpoint ``pissa init`` wrote. ``out_dir`` gets the same layout
    (shard names, index, config, tokenizer and other non-weight files): every adapted weight merged
    as :func:`merge_state_dict` merges it (bit-identical to :func:`pissa.merge` in memory), every
    other tensor copied byte for byte, the adapter's head parameters written over the base's or,
    if the base lacks them, appended to the last shard (config.json then gets the head's labels).

    Memory: one adapted weight and its merge arithmetic plus a 16 MiB copy buffer, whatever the
    checkpoint's size; nothing is memory-mapped and every range read is dropped from the page cache
    once used (see the module docstring). It gets a model card (``README.md``,
    :func:`~pissa.files.card.merged_card`) in place of the base's. All-or-nothing: the result is written in
    ``.OUT.tmp-XXXX`` next to ``out_dir`` (:func:`~pissa.files.atomic.atomic_dir`) and renamed into place at the
    end; on any error (a weight that is not the adapter's base: PissaError) that folder is removed. ``out_dir`` must not exist.
    """
    out = Path(out_dir)
    if out.exists():
        raise PissaError(f"{out} already exists; choose a new output folder or remove it")
    ckpt = open_checkpoint(model_dir)
    adapter = _Adapter(adapter_dir)
    check_shards(ckpt.root, ckpt.shards)  # a residual checkpoint pissa init wrote: every shard as written
    arch = architecture(ckpt.root)
    prefix = arch["prefix"] if arch is not None else None
    keys = _layer_keys(adapter, ckpt.entries, str(ckpt.root), prefix)
    for key in keys.values():
        e = ckpt.entries[key]
        if e.dtype not in DECOMPOSABLE:
            raise PissaError(
                f"adapter at {adapter.path} was made for another model: {key} in {ckpt.root} is {e.dtype}, not a float matrix"
            )
    known = {n: arch["conv1d"][n] for n in adapter.layers if arch is not None and n in arch["conv1d"]}
    layouts = _layouts(adapter, {n: ckpt.entries[k].shape for n, k in keys.items()}, known)
    replace, add = _head_plan(adapter, ckpt.entries, {k: e.shape for k, e in ckpt.entries.items()}, prefix)
    head = adapter.head()
    work: dict[str, Callable[[Tensor], Tensor] | Tensor] = {
        key: functools.partial(_merge_layer, adapter, name, conv1d=layouts[name]) for name, key in keys.items()
    }
    work.update({key: head[name].to(TORCH_DTYPES[ckpt.entries[key].dtype]) for key, name in replace.items()})
    added = {name: head[name].contiguous() for name in add}

    with atomic_dir(out, exist_ok=False) as tmp:
        reader = Reader()
        total = sum(e.end - e.start for e in ckpt.entries.values())
        with torch.no_grad(), tqdm(total=total, desc="merging", unit="B", unit_scale=True, disable=not progress) as bar:
            grown = 0
            for shard in ckpt.shards:
                last = shard == ckpt.shards[-1]
                entries = {k: e for k, e in ckpt.entries.items() if e.shard == shard}
                grown += _merge_shard(ckpt.root / shard, tmp / shard, entries, work, added if last else {}, reader, bar)
        copy_other_files(ckpt.root, tmp)
        if added and ckpt.index is not None:
            index = json.loads((ckpt.root / ckpt.index).read_text())
            index["weight_map"].update({name: ckpt.shards[-1] for name in added})
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                index["metadata"]["total_size"] += grown
            (tmp / ckpt.index).write_text(json.dumps(index, indent=2))
        if adapter.head_names:
            config = json.loads((ckpt.root / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps(_classifier_config(config, adapter), indent=2))
        (tmp / CARD_FILE).write_text(merged_card(adapter.doc), encoding="utf-8")  # replaces a copied base card
        if out.exists():
            raise PissaError(f"{out} appeared while merging; choose a new output folder or remove it")
    return out
