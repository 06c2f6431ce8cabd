"""A Hugging Face safetensors checkpoint folder: validated (config, shards, index), its tensors located by byte
range, its other files copied.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.errors import PissaError
from pissa.files.digests import SHARD_DIGESTS
from pissa.files.safetensors import Entry, shard_entries

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_FILES = ((SINGLE, INDEX), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"))
"""``(single file, index)`` names of a checkpoint's weights: transformers' ``save_pretrained``, then diffusers'."""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
"""Files never copied to OUT/residual besides the residual shards (other copies of the base weights)."""


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face safetensors checkpoint folder, validated: every shard present and complete."""

    root: Path
    shards: list[str]
    entries: dict[str, Entry]
    index: str | None
    """The name of its shard index (None: one file)."""

    @property
    def indexed(self) -> bool:
        return self.index is not None


def open_checkpoint(root: str | os.PathLike) -> Checkpoint:
    """Validate a checkpoint folder (config.json, one model.safetensors or shards + index) and read its headers."""
    root = Path(root)
    if not root.is_dir():
        raise PissaError(f"{root} is not a folder; pass a Hugging Face model folder with config.json and *.safetensors")
    if not (root / "config.json").is_file():
        raise PissaError(f"{root} has no config.json; pass a Hugging Face model folder (save_pretrained writes one)")
    index = next((i for _, i in WEIGHT_FILES if (root / i).is_file()), None)
    single = next((f for f, _ in WEIGHT_FILES if (root / f).is_file()), None)
    if index is not None:
        try:
            weight_map: dict[str, str] = json.loads((root / index).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PissaError(f"{root / index} is not a valid safetensors index; re-save the checkpoint") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise PissaError(f"{root} lacks shard {missing[0]} named in {index}; copy or re-download it")
    elif single is not None:
        weight_map, shards = {}, [single]
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])} but no {INDEX})" if found else ""
        raise PissaError(
            f"{root} has no {SINGLE} or {INDEX}{hint}; save the model with save_pretrained(..., safe_serialization=True)"
        )
    entries: dict[str, Entry] = {}
    for shard in shards:
        entries.update(shard_entries(root / shard))
    for key, shard in weight_map.items():
        if key not in entries or entries[key].shard != shard:
            raise PissaError(f"{index} places {key} in {shard}, which does not hold it; re-save the checkpoint")
    return Checkpoint(root, shards, entries, index)


def tensor_key(name: str, keys: dict[str, Any] | set[str], prefix: str | None = None) -> str | None:
    """The key holding parameter ``name`` (e.g. ``model.layers.0.mlp.up_proj.weight``): the name itself,
    else the name without the model's ``base_model_prefix`` (a checkpoint saved from the bare base model;
    ``prefix`` None: without its first component); None if neither is there."""
    if name in keys:
        return name
    head, _, rest = name.partition(".")
    if rest and (prefix is None or head == prefix) and rest in keys:
        return rest
    return None


def not_copied(folder: str | os.PathLike, names: list[str]) -> list[str]:
    """Names never copied to OUT/residual or a merged checkpoint: hidden files, weight files and a residual
    checkpoint's shard digests, which describe only its own shards (a ``shutil.copytree`` ignore)."""
    return [n for n in names if n.startswith(".") or n.endswith(WEIGHT_SUFFIXES) or n == SHARD_DIGESTS]


def copy_other_files(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's files besides the weights: config, index, tokenizer, generation config,
    folders such as 1_Pooling/ (weight files inside them too are left out)."""
    for path in src.iterdir():
        if not not_copied(path.parent, [path.name]):
            if path.is_dir():
                shutil.copytree(path, dst / path.name, ignore=not_copied)
            else:
                shutil.copyfile(path, dst / path.name)
