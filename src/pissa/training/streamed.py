"""The FSDP route that never holds the whole model in one process (``pissa finetune --nproc N --fsdp``).

Loading the base whole in every process and then sharding it costs each rank the full model for a while.
Instead, for an adapter on a causal LM stored as a safetensors checkpoint:

1. :func:`~pissa.checkpoints.init.init_checkpoint` decomposes the checkpoint streamed, one target tensor
   at a time, the ranks splitting the targets (the ``pissa init`` route: the same per-layer factors and
   residuals as ``attach``), into ``SCRATCH/residual`` + ``SCRATCH/adapter``; resumable, and kept until
   the run ends so that a resumed run reuses it;
2. every rank builds the model on the meta device from the residual's config and
   :func:`~pissa.checkpoints.sharded.load_sharded` fills only its own shard of every weight, reading only
   those rows from the files (a resumed run loads its checkpoint's adapter onto the same residual).

So a rank's peak is about one target tensor's SVD workspace plus its ``1/N`` of the model (plus the buffers
every rank holds: A0/B0, rotary tables). Other runs (a sequence classifier's new head, full fine-tuning, a
compressed model, a checkpoint that is not safetensors or not stored in the run's dtype) load whole and
shard, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pissa.adapter.config import AdapterConfig
from pissa.checkpoints.folder import open_checkpoint
from pissa.checkpoints.init import init_checkpoint
from pissa.checkpoints.sharded import load_sharded
from pissa.files.safetensors import TORCH_DTYPES
from pissa.methods.registry import METHODS
from pissa.runtime import hub
from pissa.runtime.hub import Kind

SCRATCH = "sharded-init"
"""The folder, inside a run's working folder, that holds the streamed decomposition until the run ends."""


def streams(method: str, kind: Kind, model_dir: Path, dtype: torch.dtype) -> bool:
    """Whether a sharded run takes the streamed route: an adapter method, a causal LM (no new head to
    initialise), weights in safetensors files in ``model_dir``, all floating-point tensors stored in the run's
    ``dtype``. (An adapter records its base's dtype and digests: one decomposed from float32 weights is not the
    adapter of a bfloat16 run, so a run in another dtype than the checkpoint's loads whole, as before.)"""
    if not (METHODS[method].adapter and kind == "causal-lm" and any(model_dir.glob("*.safetensors"))):
        return False
    stored = {TORCH_DTYPES[e.dtype] for e in open_checkpoint(model_dir).entries.values() if e.dtype in TORCH_DTYPES}
    return {d for d in stored if d.is_floating_point} == {dtype}


def load_streamed(name: str, cfg: AdapterConfig, dtype: torch.dtype, device: torch.device,
                  scratch: Path, trained: Path | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the sharded, adapted causal LM ``name`` (its checkpoint folder,
    :func:`~pissa.runtime.hub.resolve_model`), its base in ``dtype``; ``scratch``: where the streamed decomposition
    is (made here when missing); ``trained``: a saved adapter (a resumed run's) to load instead of the fresh one.
    Every rank calls it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = hub.resolve_model(name)

    if not (scratch / "adapter").is_dir():
        init_checkpoint(model_dir, scratch, cfg, progress=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(scratch / "residual"), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    load_sharded(model, scratch / "residual", trained or scratch / "adapter", device=device)
    hub.finish_loaded(model, tokenizer, name, "causal-lm")
    return model, tokenizer
