"""transformers' Trainer and TRL's SFTTrainer on a pissa-attached model: adapter-only checkpoints.

    model, tok = pissa.hub.load_model("smollm2")
    pissa.attach(model, pissa.AdapterConfig(rank=16))
    trainer = SFTTrainer(model=model, args=SFTConfig("runs/sft", save_steps=50, ...), ...)
    trainer.train()                                  # runs/sft/checkpoint-50/adapter/ ...
    trainer.train(resume_from_checkpoint=True)       # after a crash: continues exactly
    trainer.save_model("runs/sft/final")             # runs/sft/final/adapter/
    pissa.load_adapter(base, "runs/sft/final/adapter")

There is nothing to call and no callback to add: :func:`pissa.attach` and :func:`pissa.load_adapter`
give a Hugging Face model (anything with ``save_pretrained``) the ``save_pretrained`` of
:class:`AdapterSaver`, and :func:`pissa.merge` takes it away again. ``model.save_pretrained(folder)`` then writes

    folder/adapter/                       the adapter (save_adapter's format: what pissa.load_adapter reads)
    folder/model.safetensors.index.json   transformers' index of a sharded checkpoint, listing only the
                                          trainable tensors, each in its file under adapter/

and no model weights. For SmolLM2 at rank 16 on every projection the adapter is 39 MB (the trained
and the initial factors) where the model is 538 MB; a Trainer checkpoint adds the AdamW moments
(``optimizer.pt``, 39 MB) and its small state files.

Why this mechanism (transformers 5.23, TRL 1.16):

- Every way the Trainer writes a model ends in ``model.save_pretrained(folder)``: ``_save_checkpoint``
  calls ``save_model``, which calls ``_save``, which calls it (the DeepSpeed, FSDP and SageMaker
  branches hand it a gathered ``state_dict``, refused below). SFTTrainer inherits all of this; its
  ``_save_checkpoint`` only adds a model card. So the model's own save is the one place that sees
  every checkpoint *before* anything is written. A ``TrainerCallback`` is the wrong place: its
  ``on_save`` runs after the whole model is on disk and could only delete it again, and a callback
  that the user forgets brings back whole-model checkpoints that ``from_pretrained`` cannot read.
  PEFT does the same: ``PeftModel.save_pretrained`` writes only the adapter. The method is set on
  the instance (accelerate and TRL patch ``forward`` the same way).
- Resuming (``Trainer._load_from_checkpoint``) and ``load_best_model_at_end`` (``_load_best_model``)
  accept a folder with full weights, a PEFT adapter (only for ``PeftModel`` instances) or a sharded
  checkpoint index; the index is the one they load partially without complaint
  (``load_sharded_checkpoint(strict=False)``). So the checkpoint carries an index naming the trained
  tensors (their state-dict names are the adapter file's keys), and the Trainer's own code puts them back;
  it restores the optimizer, scheduler, RNG and data position as for any model. The initial factors
  and the residual are not in the index: they come from attach in the resuming process, which must
  use the same base, config and seed (as with ``pissa finetune --resume``).
- ``_keys_to_ignore_on_save`` is set to every other state-dict entry: transformers' own name for
  entries a model does not save, which the Trainer compares with the missing keys after that load
  (equal: no warning; else it logs all ~270 frozen names).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from pissa.adapter.attach import ADAPT_HOOKS
from pissa.adapter.save_load import head_parameters, save_adapter
from pissa.errors import PissaError
from pissa.files.adapter_dir import HEAD_FILE, TENSORS_FILE
from pissa.files.atomic import atomic_write_text

ADAPTER_DIR = "adapter"
"""The adapter's subfolder in a folder written by ``save_pretrained`` (a Trainer checkpoint)."""

INDEX_FILE = "model.safetensors.index.json"
"""transformers' name for the index of a sharded checkpoint (``SAFE_WEIGHTS_INDEX_NAME``)."""


class AdapterSaver:
    """The ``save_pretrained`` of a pissa-attached Hugging Face model; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.keys_to_ignore = getattr(model, "_keys_to_ignore_on_save", None)
        """The model's own ``_keys_to_ignore_on_save``, put back by :func:`pissa.merge`."""

    def __call__(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write ``save_directory/adapter/`` and the index of its trainable tensors (other transformers
        options such as ``max_shard_size`` do not apply and are ignored)."""
        if state_dict is not None:
            raise PissaError("a pissa model saves its adapter from its own parameters, not from a state_dict; "
                             "under DeepSpeed or FSDP train with pissa finetune --fsdp instead")
        if push_to_hub:
            raise PissaError("save_pretrained(push_to_hub=True) is not supported for a pissa model; "
                             "save the folder, then upload it (or call model.push_to_hub)")
        if not is_main_process:
            return
        folder = Path(save_directory)
        save_adapter(self.model, folder / ADAPTER_DIR)
        index = adapter_index(self.model)
        atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2))
        self.model._keys_to_ignore_on_save = set(self.model.state_dict()) - set(index["weight_map"])  # type: ignore[assignment]


def trained_keys(model: nn.Module) -> dict[str, str]:
    """``{state-dict name: file under adapter/}`` of every trainable tensor: the factors that train
    (``{layer}.lora_A``, ...) in the adapter's tensor file, a trained head in its head file."""
    head = set(head_parameters(model))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: f"{ADAPTER_DIR}/{HEAD_FILE if n in head else TENSORS_FILE}" for n in trained}


def adapter_index(model: nn.Module) -> dict[str, Any]:
    """The sharded-checkpoint index of the adapter that ``save_pretrained`` writes: its trainable tensors only."""
    return {
        "metadata": {"format": "pissa-adapter",
                     "note": f"the trainable tensors only; load with pissa.load_adapter(base, '{ADAPTER_DIR}')"},
        "weight_map": dict(sorted(trained_keys(model).items())),
    }


def _on_adapt(model: nn.Module, adapted: bool) -> None:
    """The :data:`pissa.adapter.attach.ADAPT_HOOKS` entry: install :class:`AdapterSaver` on a Hugging Face model
    that attach / load_adapter adapted, and remove it from one that merge made plain again."""
    saver = vars(model).get("save_pretrained")
    if not adapted:
        if isinstance(saver, AdapterSaver):
            del model.save_pretrained
            model._keys_to_ignore_on_save = saver.keys_to_ignore  # type: ignore[assignment]
    elif callable(getattr(type(model), "save_pretrained", None)):  # a Hugging Face model
        if not isinstance(saver, AdapterSaver):
            model.save_pretrained = AdapterSaver(model)  # type: ignore[assignment]
        model._keys_to_ignore_on_save = set(model.state_dict()) - set(trained_keys(model))  # type: ignore[assignment]


if _on_adapt not in ADAPT_HOOKS:
    ADAPT_HOOKS.append(_on_adapt)
