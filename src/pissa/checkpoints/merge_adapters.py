"""``pissa merge-adapters``: several adapters of one base into RMM's reversible basis, or into one adapter.

The adapters must come from one base (fingerprint), method, rank, targets and init seed, so every layer starts
from the same factors ``X0``; each is read through :class:`~pissa.files.adapter_dir.AdapterFiles`. A task's
*movement* is ``X_t - X0`` per trainable factor, and a factor's *positions* are the vectors along its rank
(:attr:`pissa.adapter.shapes.base.Shape.rank_axes`: a row of ``lora_B (out, r)``, a column of ``lora_A (r, in)``).

RMM (arXiv 2510.14163) stacks, per position, the T tasks' r-vectors into ``X (r, T)`` and keeps its SVD's p
leading left singular vectors and the tasks' coefficients (:func:`pissa.methods.merging.rmm_basis`). The paper
stacks the factors of each low-rank delta; a PiSSA adapter's factors start at the shared principal factors X0
(stored once here), so what is stacked is the movement ``X_t - X0`` (for LoRA's B, X0 = 0: the same thing).

The merged folder (:data:`MERGED_FILE`, :data:`TENSORS_FILE`)::

    merged.json           {"format": "pissa-merged-adapters", "version": 1, "tasks": [names], "p", "components",
                           "adapter": the sources' adapter document (config, layers, base), "storage": {...},
                           "integrity": {"tensors": digest}}
    merged.safetensors    {layer}.{factor}.basis (n, r, q), {layer}.{factor}.coefficients (n, q, T),
                          {layer}.{factor}.discarded (n,), and every frozen tensor {layer}.{name} (X0 etc.)

:func:`rebuild_task` turns it back into task t's adapter, ``X0 + basis @ coefficients[:, :, t]`` per position,
written as a normal adapter folder. The single merges (:func:`merge_single`) combine the movements of each factor
separately (linear: mean; TIES; DARE: :mod:`pissa.methods.merging`) into one adapter folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from pissa.adapter.shapes import get_shape
from pissa.adapter.shapes.lowrank import FACTOR_A, FACTOR_B, LOWRANK
from pissa.errors import PissaError
from pissa.files.adapter_dir import INTEGRITY, AdapterFiles, write_adapter
from pissa.files.atomic import atomic_dir
from pissa.files.digests import ALGORITHM, tensors_digest
from pissa.files.safetensors import shard_entries
from pissa.methods.merging import dare_merge, linear_merge, rmm_basis, ties_merge

FORMAT = "pissa-merged-adapters"
VERSION = 1
MERGED_FILE = "merged.json"
TENSORS_FILE = "merged.safetensors"
MATCHING = ("method", "rank", "rank_pattern", "alpha", "targets", "seed")
"""The adapter config fields that must agree (besides the base fingerprint) for adapters to be merged."""


@dataclass(frozen=True)
class Storage:
    """Tensor bytes and factor values of the merged folder vs keeping every source adapter."""

    merged_bytes: int
    adapters_bytes: int
    merged_values: int
    """Basis plus coefficients values (the trainable factors' share of the merged folder)."""
    task_values: int
    """The T adapters' trainable factor values."""

    @property
    def ratio(self) -> float:
        """``merged_bytes / adapters_bytes``."""
        return self.merged_bytes / self.adapters_bytes

    @property
    def values_ratio(self) -> float:
        """``merged_values / task_values``: per position ``q (r + T) / (r T)``."""
        return self.merged_values / self.task_values


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_adapters` wrote: the task names, the components kept, the storage and each task's
    relative factor error ``||rebuilt - X_t||_F / ||X_t - X0||_F`` over all factors (0 when exact)."""

    path: Path
    tasks: list[str]
    components: int
    storage: Storage
    errors: dict[str, float]


def open_adapters(paths: Sequence[str | os.PathLike]) -> list[AdapterFiles]:
    """The adapters at ``paths`` opened and checked to merge (one line each for a different base, method, rank,
    targets, init seed, layer set, initial factors, a trained head or a shape without factors)."""
    adapters = [AdapterFiles(p) for p in paths]
    first = adapters[0]
    for a in adapters:
        if a.head_names:
            raise PissaError(f"adapter at {a.path} has trained head parameters ({a.head_names[0]}, ...); "
                             "merge-adapters merges the adapters of models without a trained head")
        for name, meta in a.layers.items():
            shape = get_shape(meta.get("shape", LOWRANK))
            trained = meta.get("train", [FACTOR_A, FACTOR_B])
            if not shape.rank_axes or any(k not in shape.rank_axes for k in trained):
                raise PissaError(f"adapter at {a.path}: layer {name} ({shape.name}, training {', '.join(trained)}) has "
                                 "no factors of a rank to merge per position; merge low-rank adapters")
    for a in adapters[1:]:
        for key in MATCHING:
            if a.doc["config"].get(key) != first.doc["config"].get(key):
                raise PissaError(f"adapter at {a.path} has {key} {a.doc['config'].get(key)!r} and {first.path} has "
                                 f"{first.doc['config'].get(key)!r}; merge adapters of one {key}")
        if a.doc["config"] != first.doc["config"] or a.layers.keys() != first.layers.keys():
            diff = sorted(k for k in a.doc["config"] if a.doc["config"][k] != first.doc["config"].get(k))
            raise PissaError(f"adapter at {a.path} differs from {first.path} in "
                             f"{', '.join(diff) if diff else 'its adapted layers'}; merge adapters made alike")
        if a.doc["base_fingerprint"] != first.doc["base_fingerprint"]:
            raise PissaError(f"adapter at {a.path} was made from a different base than {first.path} (fingerprint "
                             f"{a.doc['base_fingerprint']} vs {first.doc['base_fingerprint']}); merge adapters of one base")
        if a.doc["residual_fingerprint"] != first.doc["residual_fingerprint"]:
            raise PissaError(f"adapter at {a.path} starts from other initial factors than {first.path} (residual "
                             "fingerprints differ); merge adapters initialized alike")
    return adapters


def _positions(x: Tensor, axis: int) -> Tensor:
    """``x`` with its rank axis last, flattened to ``(n, r)``: one r-vector per position."""
    moved = x.movedim(axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _unpositions(v: Tensor, axis: int, shape: torch.Size) -> Tensor:
    """The inverse of :func:`_positions`: ``v (n, r)`` back to ``shape``."""
    moved = list(shape)
    moved.append(moved.pop(axis))
    return v.reshape(moved).movedim(-1, axis)


def _layer_factors(adapters: list[AdapterFiles], name: str) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """Layer ``name``: its frozen tensors (the first adapter's; every adapter's must be equal), the movements
    ``(T, *factor shape)`` in float64 of each trained factor, and each factor's rank axis."""
    meta = adapters[0].layers[name]
    shape = get_shape(meta.get("shape", LOWRANK))
    trained = list(meta.get("train", [FACTOR_A, FACTOR_B]))
    layers = [a.layer(name) for a in adapters]
    frozen = {k: v for k, v in layers[0].items() if k not in trained}
    for a, t in zip(adapters[1:], layers[1:], strict=True):
        if any(not torch.equal(t[k], v) for k, v in frozen.items()):
            raise PissaError(f"adapter at {a.path}: the initial factors of layer {name} differ from {adapters[0].path}'s; "
                             "merge adapters initialized alike")
    moves = {k: torch.stack([t[k].double() - t[shape.variables[k]].double() for t in layers]) for k in trained}
    return frozen, moves, {k: shape.rank_axes[k] for k in trained}


def _source_doc(adapter: AdapterFiles) -> dict[str, Any]:
    return {k: v for k, v in adapter.doc.items() if k != INTEGRITY}


def _task_names(paths: Sequence[str | os.PathLike], names: list[str] | None) -> list[str]:
    tasks = list(names) if names is not None else [Path(p).resolve().name for p in paths]
    if len(set(tasks)) != len(tasks):
        raise PissaError(f"`names` must be distinct, got {', '.join(tasks)} (pass `names` when folders share a name)")
    return tasks


def merge_adapters(paths: Sequence[str | os.PathLike], out: str | os.PathLike, p: int, names: list[str] | None = None,
                   progress: bool = True) -> Merged:
    """RMM: write the merged folder ``out`` (atomically) keeping ``p`` components per position of the adapters at
    ``paths`` (see the module docstring); task names default to the folders' names."""
    if p < 1:
        raise PissaError(f"`p` must be an integer >= 1, got {p}")
    tasks = _task_names(paths, names)
    adapters = open_adapters(paths)
    tensors: dict[str, Tensor] = {}
    values = task_values = 0
    moved = {t: 0.0 for t in tasks}
    missed = {t: 0.0 for t in tasks}
    components = 0
    for name in tqdm(list(adapters[0].layers), desc="merge", unit="layer", disable=not progress):
        frozen, moves, axes = _layer_factors(adapters, name)
        tensors.update({f"{name}.{k}": v for k, v in frozen.items()})
        for k, move in moves.items():
            dtype = frozen[get_shape(adapters[0].layers[name].get("shape", LOWRANK)).variables[k]].dtype
            stack = torch.stack([_positions(m, axes[k]) for m in move], -1)  # (n, r, T)
            basis = rmm_basis(stack, p)
            stored = basis.basis.to(dtype), basis.coefficients.to(dtype)
            rebuilt = stored[0].double() @ stored[1].double()
            for i, t in enumerate(tasks):
                moved[t] += stack[:, :, i].square().sum().item()
                missed[t] += (rebuilt[:, :, i] - stack[:, :, i]).square().sum().item()
            tensors[f"{name}.{k}.basis"], tensors[f"{name}.{k}.coefficients"] = stored
            tensors[f"{name}.{k}.discarded"] = basis.discarded.to(dtype)
            values += stored[0].numel() + stored[1].numel()
            task_values += stack.numel()
            components = max(components, stored[0].shape[-1])
    merged_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    adapters_bytes = sum(e.end - e.start for a in adapters for e in a.entries.values())
    storage = Storage(merged_bytes, adapters_bytes, values, task_values)
    errors = {t: (missed[t] / moved[t]) ** 0.5 if moved[t] else 0.0 for t in tasks}
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "tasks": tasks, "p": p, "components": components,
                           "sources": [str(a.path) for a in adapters], "adapter": _source_doc(adapters[0]),
                           "storage": {"merged_bytes": merged_bytes, "adapters_bytes": adapters_bytes,
                                       "ratio": storage.ratio, "merged_values": values, "task_values": task_values,
                                       "values_ratio": storage.values_ratio},
                           "relative_errors": errors}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        doc[INTEGRITY] = {"algorithm": ALGORITHM, "tensors": tensors_digest(tmp / TENSORS_FILE, _entries(tmp))}
        (tmp / MERGED_FILE).write_text(json.dumps(doc, indent=2))
    return Merged(Path(out), tasks, components, storage, errors)


def _entries(folder: Path) -> dict:
    path = folder / TENSORS_FILE
    return shard_entries(path, f"{path} cannot be read ({{}}); merge the adapters again")


def read_merged(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The document and tensors of a merged folder, checked against its recorded digest (one-line PissaError)."""
    path = Path(path)
    if not (path / MERGED_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise PissaError(f"{path} is not a merged folder (needs {MERGED_FILE} and {TENSORS_FILE}); pass the folder "
                         "merge-adapters wrote")
    try:
        doc = json.loads((path / MERGED_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PissaError(f"{path / MERGED_FILE} is not valid JSON ({e}); merge the adapters again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise PissaError(f"{path} is not a {FORMAT} v{VERSION} folder; merge the adapters again")
    if doc.get(INTEGRITY, {}).get("tensors") != tensors_digest(path / TENSORS_FILE, _entries(path)):
        raise PissaError(f"{TENSORS_FILE} in {path} does not match the digest {MERGED_FILE} records (changed or damaged "
                         "after it was written); merge the adapters again")
    return doc, load_file(str(path / TENSORS_FILE))


def rebuild_task(merged: str | os.PathLike, task: str, out: str | os.PathLike) -> Path:
    """Task ``task``'s adapter from the merged folder ``merged``, written as an adapter folder ``out``
    (``pissa.load_adapter`` loads it): each factor ``X0 + basis @ coefficients[:, :, t]`` per position."""
    doc, stored = read_merged(merged)
    if task not in doc["tasks"]:
        raise PissaError(f"`task` {task!r} is not in {merged} (tasks: {', '.join(doc['tasks'])})")
    t = doc["tasks"].index(task)
    source = doc["adapter"]
    tensors: dict[str, Tensor] = {}
    for name, meta in source["layers"].items():
        shape = get_shape(meta.get("shape", LOWRANK))
        prefix = f"{name}."
        frozen = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        tensors.update({prefix + k: v for k, v in frozen.items()})
        for k in meta.get("train", [FACTOR_A, FACTOR_B]):
            x0 = frozen[shape.variables[k]]
            move = stored[f"{prefix}{k}.basis"].double() @ stored[f"{prefix}{k}.coefficients"][:, :, t : t + 1].double()
            tensors[prefix + k] = (x0.double() + _unpositions(move.squeeze(-1), shape.rank_axes[k], x0.shape)).to(x0.dtype)
    return write_adapter(out, source["config"], tensors, source["layers"], base=source.get("base_model"))


def merge_single(paths: Sequence[str | os.PathLike], out: str | os.PathLike, method: str, *, density: float = 0.5,
                 drop: float = 0.5, seed: int = 0, progress: bool = True) -> Path:
    """One adapter folder ``out`` whose factors are ``X0 + merge(X_t - X0)`` per factor, ``method`` linear (mean),
    ties (``density``) or dare (``drop``, seeded by ``seed``)."""
    if method not in ("linear", "ties", "dare"):
        raise PissaError(f"`method` must be one of rmm, linear, ties, dare; got {method!r}")
    adapters = open_adapters(paths)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name in tqdm(list(adapters[0].layers), desc=method, unit="layer", disable=not progress):
        frozen, moves, _ = _layer_factors(adapters, name)
        tensors.update({f"{name}.{k}": v for k, v in frozen.items()})
        variables = get_shape(adapters[0].layers[name].get("shape", LOWRANK)).variables
        for k, move in moves.items():
            merged = (linear_merge(move) if method == "linear" else ties_merge(move, density) if method == "ties"
                      else dare_merge(move, drop, generator))
            x0 = frozen[variables[k]]
            tensors[f"{name}.{k}"] = (x0.double() + merged).to(x0.dtype)
    source = _source_doc(adapters[0])
    return write_adapter(out, source["config"], tensors, source["layers"], base=source.get("base_model"))
