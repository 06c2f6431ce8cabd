"""Checkpoints of a run (no pickle: safetensors + JSON): the adapter (or trained weights), the optimizer moments,
the RNG states and the loop's progress, written atomically; a sharded run's are gathered whole.

``state.json`` records ``"integrity": {"algorithm": "xxh3-128", "files": {"state.safetensors": digest,
"weights.safetensors": digest (full fine-tuning)}, "state": digest}``: each file's
:func:`~pissa.files.digests.file_digest` and the :func:`~pissa.files.digests.doc_digest` of ``state.json``
without that entry; the adapter inside carries its own (:mod:`pissa.files.adapter_dir`). A resume refuses a
checkpoint that disagrees (:func:`verify_checkpoint`); one written before the record existed is resumed unchecked.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pissa.adapter.attach import adapted_layers
from pissa.adapter.compressed import write_record
from pissa.adapter.save_load import AdapterContents, gather_adapter, load_adapter
from pissa.errors import PissaError
from pissa.files.atomic import atomic_dir
from pissa.files.digests import ALGORITHM, doc_digest, file_digest
from pissa.runtime import distributed

CHECKPOINT = "checkpoint"
STATE = "state.safetensors"
"""Optimizer moments and RNG states of a checkpoint."""
INTEGRITY = "integrity"


@dataclass
class Progress:
    """The loop's state besides the model and optimizer."""

    step: int = 0
    train_loss: list[list[float]] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)
    """``[step, L2 norm of the whole gradient before clipping]`` per step."""
    eval_before: dict[str, float] | None = None
    seconds: float = 0.0
    """Wall time of the run so far, every session (load, evaluation, training) included."""
    train_seconds: float = 0.0
    """Time spent in training steps."""
    tokens: int = 0

    def __post_init__(self) -> None:
        self._mark = time.perf_counter()

    def tick(self) -> None:
        """Add the wall time since the last tick (or since this session started) to ``seconds``."""
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Write ``path`` atomically: ``adapter/`` (save_adapter), ``state.safetensors`` (optimizer
    moments, torch RNG states), ``state.json`` (step, losses, optimizer hyper-parameters, the
    float16 gradient scaler's state).

    Under torchrun every rank calls this and rank 0 writes. A sharded model's adapter and optimizer
    moments are gathered whole, so the checkpoint is the same whether the run was sharded or not.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for i, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"optimizer.{i}.{k}"] = distributed.full(v.detach()).contiguous().cpu()
    trained = gather_trained(model)
    progress.tick()
    if not distributed.is_main():
        return
    doc = {"progress": dataclasses.asdict(progress), "param_groups": sd["param_groups"],
           "scaler": None if scaler is None else scaler.state_dict()}
    with atomic_dir(path) as tmp:
        if isinstance(trained, AdapterContents):
            trained.write(tmp / "adapter")
        else:
            save_file(trained, str(tmp / WEIGHTS))
        save_file(tensors, str(tmp / STATE))
        doc = json.loads(json.dumps(doc))  # as it reads back (tuples as lists), for its digest
        files = {name: file_digest(tmp / name) for name in (STATE, WEIGHTS) if (tmp / name).is_file()}
        doc[INTEGRITY] = {"algorithm": ALGORITHM, "files": files, "state": doc_digest(doc)}
        (tmp / "state.json").write_text(json.dumps(doc))


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint at ``path``, after checking it and its files against the digests it
    records (see the module docstring); PissaError in one line naming a changed or damaged file."""
    fix = f"restore it, or delete {path} and start again without `resume`"
    try:
        doc = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PissaError(f"state.json in {path} cannot be read ({e}); {fix}") from None
    recorded = doc.get(INTEGRITY) if isinstance(doc, dict) else None
    if recorded is None:
        return doc  # written before checkpoints recorded digests
    if not isinstance(recorded, dict) or recorded.get("state") != doc_digest({k: v for k, v in doc.items() if k != INTEGRITY}):
        raise PissaError(f"state.json in {path} does not match the digest it records (changed or damaged after it "
                         f"was saved); {fix}")
    for name, digest in (recorded.get("files") or {}).items():
        if not (path / name).is_file() or file_digest(path / name) != digest:
            raise PissaError(f"{name} in {path} does not match the digest its state.json records (changed or damaged "
                             f"after it was saved); {fix}")
    return doc


WEIGHTS = "weights.safetensors"
"""A full fine-tuning checkpoint's trained weights (an adapter run's checkpoint holds ``adapter/`` instead)."""


def gather_trained(model: nn.Module) -> AdapterContents | dict[str, Tensor]:
    """What a checkpoint keeps of the model, whole and on the CPU (a collective for a sharded model):
    its adapter, or, with full fine-tuning, every trainable weight."""
    if any(True for _ in adapted_layers(model)):
        return gather_adapter(model)
    return {n: distributed.full(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def restore_trained(model: nn.Module, checkpoint: Path) -> None:
    """Put a checkpoint's adapter (or fully fine-tuned weights) into the freshly loaded base ``model``,
    once the checkpoint agrees with its recorded digests (:func:`verify_checkpoint`)."""
    verify_checkpoint(checkpoint)
    if (checkpoint / "adapter").is_dir():
        load_adapter(model, checkpoint / "adapter")
        return
    weights = load_file(str(checkpoint / WEIGHTS))  # every trainable weight (WeLore-COFT: the compressed factors)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(name in weights)
            if name in weights:
                p.copy_(weights[name])


def save_model(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """The fully fine-tuned model as a Hugging Face folder (``save_pretrained`` + tokenizer), written
    atomically by rank 0 (a sharded model is gathered first, on every rank)."""
    state = {n: distributed.full(t.detach()).contiguous().cpu() for n, t in model.state_dict().items()}
    if distributed.is_main():
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=state)  # type: ignore[operator]
            write_record(model, tmp)  # a compressed model's folder loads back with load_compressed
            tokenizer.save_pretrained(tmp)


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> Progress:
    """Restore the optimizer, scaler and RNG states from ``path`` (the adapter is restored by :func:`prepare`).

    The moments of a sharded parameter are cut to this rank's shard.
    """
    doc = verify_checkpoint(path)
    tensors = load_file(str(path / STATE))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            param = params[int(i)]
            state.setdefault(int(i), {})[k] = distributed.like(t, param) if t.shape == param.shape else t
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if scaler is not None and doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    return Progress(**doc["progress"])


def checkpoint_step(ckpt: Path) -> int | None:
    """The step of the checkpoint on disk, None if there is none."""
    if not (ckpt / "state.json").is_file():
        return None
    return json.loads((ckpt / "state.json").read_text())["progress"]["step"]
