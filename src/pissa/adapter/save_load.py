"""Adapters of a model to and from an adapter directory (:mod:`pissa.files.adapter_dir`).

``save_adapter`` gathers each adapted layer's tensors (of its shape, :mod:`pissa.adapter.shapes`: trained values and
frozen initial copies) and digests; ``load_adapter`` checks the base weights against the recorded digests and
rebuilds every layer from its saved tensors, its residual bit-exactly from the frozen ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pissa.adapter.attach import adapted_layers, rebuild
from pissa.adapter.base_layers import dense_weight, is_adaptable, native_weight
from pissa.adapter.config import AdapterConfig
from pissa.adapter.layer import PissaLinear
from pissa.adapter.named import activated, add_adapter, check_name, list_adapters, name_adapter
from pissa.adapter.shapes import layer_facts
from pissa.errors import PissaError
from pissa.files.adapter_dir import TENSORS_FILE, AdapterFiles, base_description, write_adapter
from pissa.files.digests import weight_digest
from pissa.methods.factors import Init
from pissa.runtime import distributed


def _layers_or_fail(model: nn.Module) -> list:
    layers = list(adapted_layers(model))
    if not layers:
        raise PissaError("this model has no pissa adapters; call pissa.attach(model, cfg) first")
    return layers


@dataclass
class AdapterContents:
    """Everything an adapter directory holds, gathered from a model (:func:`gather_adapter`)."""

    cfg: AdapterConfig
    tensors: dict[str, Tensor]
    meta: dict[str, dict[str, Any]]
    head: dict[str, Tensor]
    num_labels: int | None
    base: dict[str, str] | None

    def write(self, path: str | os.PathLike, training: dict[str, Any] | None = None) -> Path:
        """Write the adapter directory ``path`` (replaced atomically); ``training``: see :func:`save_adapter`."""
        return write_adapter(path, self.cfg.to_dict(), self.tensors, self.meta, self.head, self.num_labels, self.base,
                             training)


def gather_adapter(model: nn.Module) -> AdapterContents:
    """The model's adapters, on the CPU. For a model sharded over processes (FSDP2) this is a
    collective that every rank must call: each returns the whole adapter."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name, layer in _layers_or_fail(model):
        layer_tensors, meta[name] = layer_entry(name, layer)
        tensors.update(layer_tensors)
    head = {n: distributed.full(p.detach()).contiguous().cpu() for n, p in head_parameters(model).items()}
    num_labels = getattr(getattr(model, "config", None), "num_labels", None) if head else None
    base = getattr(model, "pissa_base", None)  # set by pissa.hub.load_model
    return AdapterContents(model.pissa_config, tensors, meta, head, num_labels, base)  # type: ignore[arg-type]


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 training: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter to directory ``path`` (replaced atomically, with its model card ``README.md``);
    returns the path. A model holding several named adapters (:func:`pissa.set_adapter`) writes the active one, or
    adapter ``name``. ``training``: the run that trained it (:func:`pissa.files.card.training_record`), which the
    card reports.

    Under torch.distributed only rank 0 writes. A model sharded over the processes (FSDP2) is
    gathered first (:func:`gather_adapter`): then every rank must call this.
    """
    with activated(model, name):
        contents = gather_adapter(model)
    return contents.write(path, training) if distributed.is_main() else Path(path)


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the adapted layers (e.g. a classification head), by name."""
    adapter = {id(p) for _, layer in adapted_layers(model) for p in layer.parameters()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter}


def layer_entry(name: str, layer: PissaLinear) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One adapted layer's share of an adapter directory: its tensors ``{name}.{key}`` and its "layers" entry."""
    tensors = {f"{name}.{key}": distributed.full(t.detach()).contiguous().cpu() for key, t in layer.tensors().items()}
    meta = {
        "in": layer.in_features,
        "out": layer.out_features,
        "base_digest": layer.base_digest,
        "base_dtype": str(layer.base_dtype).removeprefix("torch."),
        # a 4-bit residual records the digest of the dense residual it was quantized from (what `pissa init` writes)
        "residual_digest": layer.residual_digest,
        "shape": layer.shape.name,
        "train": list(layer.train_parts),
        "rank": layer.rank,
        "facts": layer.facts,
    }
    return tensors, meta


def load_adapter(base: nn.Module, path: str | os.PathLike | AdapterFiles, name: str | None = None) -> nn.Module:
    """Adapt ``base`` (the original model, unmodified) with the adapter at ``path`` (a folder, or one already
    opened as :class:`~pissa.files.adapter_dir.AdapterFiles`), in place.

    ``name``: the adapter's name (default ``"default"``). On a model that already holds adapters, ``name`` adds this
    one next to them (the active one stays active; :func:`pissa.set_adapter` switches): the base is shared, see
    :mod:`pissa.adapter.named`.

    The base may also be the residual model that ``pissa init`` wrote. Refuses any other model.
    A base on the meta device is taken as that residual model, to be filled later
    (:func:`pissa.load_sharded` does both and checks the residual's digests).
    """
    called = None if name is None else check_name(name)
    adapter = path if isinstance(path, AdapterFiles) else AdapterFiles(path)  # validated, checked against its digests
    if any(True for _ in adapted_layers(base)):
        if called is None:
            raise PissaError(f"this model already has pissa adapters ({', '.join(list_adapters(base))}); pass name= to "
                             "load another next to them, or load the adapter into the original base model")
        return add_adapter(base, adapter, called)
    path = adapter.path
    doc = adapter.doc
    cfg = AdapterConfig.from_dict(doc["config"])
    layers: dict[str, tuple[Init, dict[str, Tensor]]] = {}
    digests: dict[str, str] = {}
    residual_ready: dict[str, str] = {}
    for name, meta in doc["layers"].items():
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise PissaError(f"adapter at {path} was made for another model: layer {name!r} is missing here") from None
        W = dense_weight(module) if is_adaptable(module) else None
        if W is None or tuple(W.shape) != (meta["out"], meta["in"]):
            raise PissaError(f"adapter at {path} was made for another model: layer {name!r} has a different type or shape")
        if W.is_meta:  # a model built on the meta device: the residual checkpoint fills it (pissa.load_sharded)
            if cfg.quantize is not None:
                raise PissaError(f"adapter at {path} has a 4-bit residual (quantize={cfg.quantize}); it cannot be loaded "
                                 "onto a meta-device model: load the base model for real, then load_adapter")
            residual_ready[name] = meta["residual_digest"]
            digest = meta["residual_digest"]
        else:
            digest = weight_digest(native_weight(module))
        if digest == meta["residual_digest"]:
            residual_ready[name] = digest
        elif digest != meta["base_digest"]:
            recorded = meta.get("base_dtype", "float32")
            if str(W.dtype).removeprefix("torch.") != recorded:
                raise PissaError(f"adapter at {path} was made on a {recorded} base and this model's weights are "
                                 f"{str(W.dtype).removeprefix('torch.')}; load the base in {recorded} "
                                 f"(dtype=torch.{recorded}), adapt it, then convert")
            raise PissaError(
                f"adapter at {path} was made from a different base model (weights of {name!r} differ); "
                f"load it onto {base_description(doc)}"
            )
        tensors = adapter.layer(name)
        shape, train, rank, facts = layer_facts(meta, tensors, f"{adapter.path / TENSORS_FILE} ({name})")
        layers[name] = Init(shape.name, {}, train, facts, rank), tensors
        digests[name] = meta["base_digest"]
    rebuild(base, cfg, layers, digests, residual_ready)
    if called is not None:
        name_adapter(base, called)
    if adapter.head_names:
        _load_head(base, Path(path), adapter.head_names, adapter.head())
    return base


def _load_head(model: nn.Module, path: Path, names: list[str], head: dict[str, Tensor]) -> None:
    """Copy the saved head parameters (``HEAD_FILE``, read into ``head``) into ``model`` and make them trainable."""
    params = dict(model.named_parameters())
    for n in names:
        if n not in params or n not in head or params[n].shape != head[n].shape:
            raise PissaError(f"adapter at {path} has a head parameter {n!r} this model lacks or shapes differently; "
                             "load the model with the same head (e.g. num_labels from adapter_config.json)")
        with torch.no_grad():
            params[n].copy_(head[n])
        params[n].requires_grad_(True)
