"""Calibration statistics: what data-aware methods read, and the file ``pissa calibrate`` writes.

Per distinct layer input (modules that read the same tensor, such as q/k/v or gate/up, share
one entry) over the n non-padding calibration tokens ``x_t (in,)``:

    cov  = X^T X / n   (in, in)   the uncentred second moment ("activation covariance")
    mean = X^T 1 / n   (in,)      the centred covariance is cov - mean mean^T

and per target layer, in gradient mode, the mean gradient of the loss over the n_target
target tokens with respect to the layer's weight in ``(out, in)`` layout:

    grad = d(sum_t loss_t) / dW / n_target    (out, in)

The file is a safetensors file: tensors ``{input}.cov``, ``{input}.mean``, ``{layer}.grad``
(float32) and one JSON metadata entry (:data:`META_KEY`) with the format, each layer's input key,
shape and weight digest, the model's fingerprint, the data's digest and the token counts. It is
read lazily (:class:`Calibration`), one layer's tensors at a time; the per-batch record the
init functions take is :class:`pissa.methods.inputs.Stats`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from pissa.errors import PissaError
from pissa.files.atomic import atomic_file
from pissa.files.digests import model_fingerprint, weight_digest
from pissa.files.safetensors import SAFETENSORS_DTYPES, header_bytes
from pissa.methods.data_aware import principal_directions
from pissa.methods.inputs import Need, Stats, calibration_hint

FORMAT = "pissa-calibration"
VERSION = 1
META_KEY = "pissa"

def layer_digest(W: Tensor) -> str:
    """Digest of a layer's dense ``(out, in)`` weight as float32: the same whatever dtype a model
    held it in when that dtype converts exactly (bfloat16/float16 -> float32)."""
    return weight_digest(W.detach().float())


@dataclass
class Calibration:
    """Statistics of a model's target layers (in memory, or read lazily from a file).

    ``layers``: ``{name: {"input": key, "shape": [out, in], "digest": layer_digest}}``;
    ``info``: fingerprint, data digest, counts, whether gradients were collected.
    """

    layers: dict[str, dict[str, Any]]
    info: dict[str, Any]
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    path: Path | None = None
    components: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """Principal directions ``(k, in)`` per input key, kept by :meth:`explained_variance` for EVA's init."""
    reused: bool = False
    """True when :func:`pissa.calibrate` found these statistics in its ``out`` file and made no pass."""

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    @property
    def data_digest(self) -> str:
        return str(self.info["data_digest"])

    @property
    def has_gradients(self) -> bool:
        return bool(self.info.get("gradients"))

    @property
    def has_covariance(self) -> bool:
        return bool(self.info.get("covariance", True))

    def _get(self, key: str) -> Tensor:
        if key in self.tensors:
            return self.tensors[key]
        if self.path is None:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def _layer(self, name: str) -> dict[str, Any]:
        if name not in self.layers:
            where = self.path or "the statistics"
            raise PissaError(f"{where} has no statistics for layer {name!r} (they cover {len(self.layers)} layers, e.g. "
                             f"{next(iter(self.layers), '-')}); calibrate with the same `targets` as the adapter")
        return self.layers[name]

    def check(self, name: str, W: Tensor) -> None:
        """PissaError unless the statistics of layer ``name`` were computed on this weight ``W (out, in)``."""
        entry = self._layer(name)
        if list(W.shape) != entry["shape"] or layer_digest(W) != entry["digest"]:
            hint = calibration_hint("gradient" if self.has_gradients else "covariance")
            raise PissaError(f"calibration statistics {self.path or ''} were computed on another model (layer {name!r} "
                             f"differs, fingerprint {self.fingerprint}); {hint} with this model")

    def layer_stats(self, name: str, needs: Sequence[Need]) -> Stats:
        """Layer ``name``'s statistics (float32, on the CPU): cov and mean if ``needs`` covariance, grad if gradient."""
        entry = self._layer(name)
        cov = mean = grad = components = None
        if "covariance" in needs:
            if not self.has_covariance:
                raise PissaError(f"{self.path or 'these statistics'} hold gradients only; " + calibration_hint())
            cov, mean = self._get(f"{entry['input']}.cov"), self._get(f"{entry['input']}.mean")
            components = self.components.get(entry["input"])
        if "gradient" in needs:
            if not self.has_gradients:
                raise PissaError(f"{self.path or 'these statistics'} hold no gradients; " + calibration_hint("gradient"))
            grad = self._get(f"{name}.grad")
        return Stats(cov, mean, grad, components)

    def stats(self, names: Sequence[str], needs: Sequence[Need]) -> Stats:
        """The statistics of equal-shape layers ``names`` stacked: ``cov (L, in, in)``, ``grad (L, out, in)``."""
        parts = [self.layer_stats(n, needs) for n in names]
        stack = lambda ts: None if any(t is None for t in ts) or len({t.shape for t in ts}) > 1 else torch.stack(ts)
        return Stats(*(stack([getattr(p, f) for p in parts]) for f in ("cov", "mean", "grad", "components")))

    def explained_variance(self, names: Sequence[str], k: int | None = None) -> dict[str, Tensor]:
        """Each layer's ``k`` leading explained-variance ratios, descending (:func:`pissa.methods.data_aware.explained_variance`),
        computed once per distinct input; the directions are kept (:attr:`components`) for :meth:`layer_stats`."""
        if not self.has_covariance:
            raise PissaError(f"{self.path or 'these statistics'} hold gradients only; " + calibration_hint())
        by_input: dict[str, Tensor] = {}
        out = {}
        for n in names:
            key = self._layer(n)["input"]
            if key not in by_input:
                by_input[key], vectors = principal_directions(self._get(f"{key}.cov"), self._get(f"{key}.mean"), k)
                self.components[key] = vectors.float()
            out[n] = by_input[key]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` (a safetensors file, replaced atomically)."""
        path = Path(path)
        if path.is_dir():
            raise PissaError(f"{path} is a folder; pass a file name for the statistics, e.g. {path / 'stats.safetensors'}")
        meta = {"format": FORMAT, "version": VERSION, "layers": self.layers, **self.info}
        with atomic_file(path) as tmp:
            write_safetensors(tmp, self.keys(), self._get, {META_KEY: json.dumps(meta)})
        self.path = path
        return path

    def keys(self) -> list[str]:
        """Every tensor name of the statistics."""
        inputs = sorted({e["input"] for e in self.layers.values()})
        keys = [f"{k}.{part}" for k in inputs for part in ("cov", "mean")] if self.has_covariance else []
        return keys + ([f"{n}.grad" for n in self.layers] if self.has_gradients else [])


def write_safetensors(path: str | os.PathLike, keys: Sequence[str], get: Callable[[str], Tensor],
                      metadata: dict[str, str]) -> None:
    """A safetensors file of the tensors ``get(k)`` for ``keys``, written one tensor at a time (``save_file``
    first copies every tensor into bytes: a second copy of all the statistics). The layout: the header's
    length (u64, little-endian), the JSON header (each tensor's dtype, shape and byte range; ``__metadata__``),
    padded with spaces to 8 bytes, then the tensors' bytes in order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    at = 0
    for k in keys:
        t = get(k)
        size = t.numel() * t.element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + size]}
        at += size
    with open(path, "wb") as f:
        f.write(header_bytes(header))
        for k in keys:
            f.write(get(k).detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def fingerprint_of(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The model fingerprint of the statistics' layer digests."""
    return model_fingerprint({n: e["digest"] for n, e in layers.items()})


def open_calibration(path: str | os.PathLike) -> Calibration:
    """The statistics file at ``path``, validated (tensors are read on demand)."""
    path = Path(path)
    if not path.is_file():
        raise PissaError(f"calibration statistics {path} do not exist; " + calibration_hint())
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
    except Exception:  # not safetensors, or no pissa metadata
        raise PissaError(f"{path} is not a statistics file written by pissa calibrate; " + calibration_hint()) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PissaError(f"{path} has format {meta.get('format')!r} v{meta.get('version')}; this pissa reads "
                         f"{FORMAT} v{VERSION}: " + calibration_hint())
    layers = meta.pop("layers")
    for k in ("format", "version"):
        meta.pop(k)
    return Calibration(layers=layers, info=meta, path=path)
