"""A run's model and data, loaded, encoded and adapted (:func:`prepare`), with its evaluation and the start check
that an exact method's adapted model computes what the base computed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pissa.adapter.attach import attach
from pissa.adapter.compressed import is_compressed, load_compressed, train_factors
from pissa.data.batches import Batch, collate, collate_packed
from pissa.data.datasets import Dataset, load_data
from pissa.data.encoding import Encoded, encode_all
from pissa.data.loss import loss_sum
from pissa.errors import PissaError
from pissa.methods.registry import METHODS
from pissa.runtime import distributed, hub, memory
from pissa.runtime.devices import autocast, enable_gradient_checkpointing, resolve_device, torch_dtype
from pissa.runtime.hub import Kind
from pissa.training.checkpoint import restore_trained
from pissa.training.config import RunConfig
from pissa.training.evaluation import EvalKind, choose_eval, evaluate, evaluate_generation
from pissa.training.preference import PairBatch, evaluate_preference, pair_batch
from pissa.training.schedule import step_indices
from pissa.training.streamed import load_streamed, streams

log = logging.getLogger(__name__)

@dataclass
class Session:
    """A loaded, adapted model with its encoded data, ready to train."""

    cfg: RunConfig
    kind: Kind
    model: nn.Module
    tokenizer: Any
    dataset: Dataset
    train: list[Encoded]
    test: list[Encoded]
    label_ids: list[list[int]] | None
    device: torch.device
    eval_kind: EvalKind = "likelihood"
    """How :meth:`evaluate` scores (``--eval`` resolved by :func:`pissa.choose_eval`)."""
    references: list[str] = field(default_factory=list)
    """The reference completion of each ``test`` item (generation evaluation)."""
    sharded: bool = False
    """The model is sharded over the processes (FSDP2, ``--fsdp``)."""
    start: dict[str, float] | None = None
    """The start check of a fresh adapter (:func:`start_check`); None when resumed, fully fine-tuned or loaded
    sharded from a streamed decomposition (the base is never whole in one process to compare with)."""
    rejected: tuple[list[Encoded], list[Encoded]] | None = None
    """``--objective dpo``: the rejected answers of ``train`` and ``test`` (whose completions are the chosen ones)."""

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype (the autocast dtype when it is a half type)."""
        return torch_dtype(self.cfg.dtype)

    def batch(self, indices: Sequence[int]) -> Batch | PairBatch:
        """The training examples ``indices`` as one batch: padded rows, or packed ones (``--pack``); preference
        pairs for ``--objective dpo``."""
        items = [self.train[i] for i in indices]
        if self.rejected is not None:
            return pair_batch(items, [self.rejected[0][i] for i in indices], self.pad_id, self.device)
        if self.cfg.pack:
            return collate_packed(items, self.pad_id, self.cfg.max_length, self.dtype, self.device)
        return collate(items, self.pad_id, self.kind, self.device)

    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy; under torchrun each rank scores its share and the means are combined.

        A sharded model runs every forward on all ranks together (each all-gathers its blocks): there the ranks
        score their shares in lockstep (:func:`~pissa.runtime.distributed.lockstep`), so no rank holds the
        activations of more than its share.
        """
        items = distributed.my_share(self.test)
        if self.sharded:
            memory.trim_heap()  # training's freed small blocks, before the evaluation's activations
        eval_dtype = torch_dtype(self.cfg.eval_dtype)
        with distributed.lockstep(self.model, self.device):
            if self.rejected is not None:
                return self._evaluate_preference(items)
            with autocast(self.device, self.dtype):
                if not items:
                    result = {"loss": 0.0, "accuracy": 0.0}
                elif self.eval_kind == "generate":
                    result = evaluate_generation(
                        self.model, self.tokenizer, items, distributed.my_share(self.references), pad_id=self.pad_id,
                        max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.eval_batch_size, dtype=eval_dtype)
                else:
                    result = evaluate(self.model, items, self.dataset.labels, self.label_ids, self.kind, self.pad_id,
                                      batch_size=self.cfg.eval_batch_size, dtype=eval_dtype)
        loss_w, acc_w = self.metric_weights(items)
        loss, loss_n, acc, acc_n = distributed.all_sum([result["loss"] * loss_w, loss_w, result["accuracy"] * acc_w, acc_w])
        return {"loss": loss / loss_n, "accuracy": acc / acc_n}

    def _evaluate_preference(self, items: list[Encoded]) -> dict[str, float]:
        """:func:`~pissa.training.preference.evaluate_preference` of the test pairs (each rank its share, combined)."""
        assert self.rejected is not None
        rejected = distributed.my_share(self.rejected[1])
        with autocast(self.device, self.dtype):
            result = evaluate_preference(self.model, items, rejected, self.pad_id, self.cfg.beta, self.cfg.eval_batch_size)
        keys = sorted(result)
        totals = distributed.all_sum([result[k] * len(items) for k in keys] + [float(len(items))])
        return {k: v / max(1.0, totals[-1]) for k, v in zip(keys, totals)}

    def metric_weights(self, items: Sequence[Encoded]) -> tuple[float, float]:
        """What :func:`~pissa.training.evaluation.evaluate` averages over: (loss terms, accuracy terms) of ``items``."""
        if self.kind == "seq-cls":
            return len(items), len(items)
        if self.eval_kind == "generate":  # target tokens for the loss, examples for exact match
            return sum(e.n_targets for e in items), len(items)
        if self.dataset.labels is None:  # free text: every completion token, for both
            tokens = sum(e.n_targets for e in items)
            return tokens, tokens
        assert self.label_ids is not None
        tokens = 0
        for e in items:
            assert e.label is not None  # labelled data: every item indexes a label
            tokens += len(self.label_ids[e.label])
        return tokens, len(items)


def prepare(cfg: RunConfig, checkpoint: Path | None = None, sharded: bool = False, scratch: Path | None = None) -> Session:
    """Load, encode and adapt (``checkpoint``: restore its adapter instead of a fresh attach);
    ``sharded``: then shard the model over the processes (:func:`pissa.runtime.distributed.shard`). A sharded
    adapter run on a causal LM checkpoint with a ``scratch`` folder never loads the whole model: it is decomposed
    streamed into ``scratch`` and each rank loads its shard (:mod:`pissa.training.streamed`).

    Every user error surfaces here, before any output exists.
    """
    cfg.validate()
    if METHODS[cfg.method].compressed and not is_compressed(cfg.model):
        raise PissaError("welore fine-tunes a compressed model: run pissa compress first, "
                         "then pissa finetune --model DIR --method welore")
    if sharded and distributed.world()[1] == 1:
        raise PissaError("`fsdp` shards the model over processes: add `nproc` N (N >= 2) or launch under torchrun")
    if sharded and cfg.reg_weight > 0:
        raise PissaError("`reg_weight` (SORSA's penalty on whole factors) does not run on sharded factors; "
                         "drop `fsdp` (data-parallel `nproc` N works) or set `reg_weight` 0")
    if cfg.batch_size < distributed.world()[1]:
        raise PissaError(f"`batch_size` {cfg.batch_size} is smaller than the {distributed.world()[1]} processes; "
                         "each process takes a share of every micro-batch")
    torch.set_num_threads(cfg.threads)
    if sharded:  # an FSDP rank frees all-gathered blocks all the time: keep freed activations out of its RSS
        memory.return_freed_blocks()
    device = resolve_device(cfg.device)
    kind = hub.resolve_kind(cfg.model, cfg.kind)
    dataset = load_data(cfg.data, cfg.val_size, cfg.eval_data, columns=cfg.columns, split_name=cfg.data_split)
    check_objective(cfg, kind, dataset)
    if kind == "seq-cls" and cfg.pack:
        raise PissaError(f"`pack` joins examples of a causal LM; {cfg.model} is a sequence classifier: drop `pack`")
    if kind == "seq-cls" and dataset.labels is None:
        raise PissaError(f"{cfg.model} is a sequence classifier: it needs labelled data (text,label columns), "
                         f"but {cfg.data} has prompt,completion")
    torch.manual_seed(cfg.seed)  # a seq-cls head is drawn from the global RNG
    num_labels = len(dataset.labels) if kind == "seq-cls" and dataset.labels else None
    compressed = is_compressed(cfg.model)
    streamed = (sharded and scratch is not None and not compressed
                and streams(cfg.method, kind, hub.resolve_model(cfg.model), torch_dtype(cfg.dtype)))
    if streamed:  # a resumed run's checkpoint was verified before prepare (run)
        assert scratch is not None
        model, tokenizer = load_streamed(cfg.model, cfg.adapter, torch_dtype(cfg.dtype), device, scratch,
                                         None if checkpoint is None else checkpoint / "adapter")
    elif compressed and kind == "causal-lm":
        model, tokenizer = load_compressed(cfg.model, dtype=torch_dtype(cfg.dtype))
    else:
        model, tokenizer = hub.load_model(cfg.model, kind=kind, num_labels=num_labels, dtype=torch_dtype(cfg.dtype))
    if not streamed:
        nn.Module.to(model, device)  # before attach, so the SVD runs where the weights are
    train = encode_all(tokenizer, dataset.train, dataset.labels, kind, cfg.max_length)
    test = encode_all(tokenizer, dataset.test[: cfg.eval_size], dataset.labels, kind, cfg.max_length)
    references = [e.completion for e in dataset.test[: cfg.eval_size]]
    eval_kind = choose_eval(cfg.eval, kind, dataset.labels, references, cfg.eval_data or cfg.data)
    rejected = preference_pairs(cfg, kind, dataset, tokenizer)
    label_ids = None
    if kind == "causal-lm" and dataset.labels is not None:
        label_ids = [list(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in dataset.labels]
    start = None
    if streamed:  # adapted and sharded already (the decomposition is attach's own code, per tensor)
        pass
    elif checkpoint is not None:
        restore_trained(model, checkpoint)
    elif METHODS[cfg.method].compressed:  # WeLore-COFT: the compressed layers' factors train
        train_factors(model)
    elif not METHODS[cfg.method].adapter:  # full fine-tuning: every weight trains
        model.requires_grad_(True)
    else:
        first = collate([train[i] for i in step_indices(len(train), cfg.seed, 0, cfg.batch_size)], tokenizer.pad_token_id,
                        kind, device)
        base_loss = batch_loss(model, first, kind, torch_dtype(cfg.dtype))
        attach(model, cfg.adapter, progress=True)
        if kind == "seq-cls":
            mark_head_trainable(model)
        start = start_check(cfg, base_loss, batch_loss(model, first, kind, torch_dtype(cfg.dtype)))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if sharded and not streamed:
        distributed.shard(model, device)
    if sharded:
        memory.trim_heap()  # loading's freed buffers
    model.train()
    return Session(cfg, kind, model, tokenizer, dataset, train, test, label_ids, device, eval_kind, references, sharded, start,
                   rejected)


def check_objective(cfg: RunConfig, kind: Kind, dataset: Dataset) -> None:
    """A PissaError when the objective and the data (or model) do not go together."""
    preference = dataset.train[0].rejected is not None
    if cfg.objective == "sft":
        if preference:
            raise PissaError(f"{cfg.data} has prompt,chosen,rejected rows (preference data): add `objective` dpo")
        return
    if not preference:
        raise PissaError(f"`objective` dpo trains on prompt,chosen,rejected rows; {cfg.data} has none")
    if kind != "causal-lm" or not METHODS[cfg.method].adapter:
        raise PissaError("`objective` dpo needs a causal LM and an adapter method (its reference is the adapter's "
                         "initial factors)")
    if dataset.test and dataset.test[0].rejected is None:
        raise PissaError(f"`eval_data` '{cfg.eval_data}' must be preference rows too (prompt,chosen,rejected)")


def preference_pairs(cfg: RunConfig, kind: Kind, dataset: Dataset, tokenizer: Any) -> tuple[list[Encoded], list[Encoded]] | None:
    """The rejected answers of the train and test examples, encoded, for ``--objective dpo`` (None for sft)."""
    if cfg.objective == "sft":
        return None

    def rejected(examples: list) -> list[Encoded]:
        return encode_all(tokenizer, [dataclasses.replace(e, completion=e.rejected) for e in examples], None, kind,
                          cfg.max_length)

    return rejected(dataset.train), rejected(dataset.test[: cfg.eval_size])


START_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
"""Largest relative change of the first batch's loss that attach may cause with an exact method, per base dtype:
the residual ``W - s B0 A0`` is rounded to that dtype once (measured: benchmarks/results/init_exactness.md)."""


@torch.no_grad()
def batch_loss(model: nn.Module, batch: Batch, kind: Kind, dtype: torch.dtype) -> float:
    """Mean per-target loss of ``batch`` in eval mode (no dropout), under the run's autocast."""
    was_training = model.training
    model.eval()
    with autocast(batch.input_ids.device, dtype):
        loss = loss_sum(model, batch, kind).item() / max(1, batch.targets)
    model.train(was_training)
    return loss


def start_check(cfg: RunConfig, base: float, adapted: float) -> dict[str, float]:
    """Compare the first batch's loss before and after attach; a PissaError when a method that promises
    an exact start (:attr:`~pissa.methods.registry.Method.exact_start`, without ``quantize``) moved it by more
    than the dtype allows. A 4-bit residual or a method that starts elsewhere by design (LoRA-SB)
    reports its measured distance instead."""
    gap = abs(adapted - base) / max(abs(base), 1e-8)
    tolerance = START_TOLERANCE[cfg.dtype]
    exact = cfg.adapter.quantize is None and METHODS[cfg.method].exact_start
    if exact and not gap <= tolerance:
        raise PissaError(f"inexact init: attaching {cfg.method} moved the first batch's loss from {base:.4f} to {adapted:.4f} "
                         f"(relative {gap:.2e} > {tolerance:g} allowed in {cfg.dtype}); the adapted model must start where "
                         "the base is: report this with the model and options")
    if distributed.is_main():
        note = "" if exact else " (starts off the base by design)"
        log.info(f"{cfg.method}: start check: first batch loss {base:.4f} (base) -> {adapted:.4f} (adapted), "
                 f"relative change {gap:.1e}{note}")
    return {"base_loss": base, "adapted_loss": adapted, "relative_change": gap}


LR_WARN = 10.0
"""Warn when the learning rate exceeds the method's measured default by this factor."""


def lr_warning(cfg: RunConfig) -> str | None:
    """A warning when ``--lr`` is far above the method's measured default (PiSSA's large principal factors
    diverge at LoRA's rates); None otherwise."""
    method = METHODS[cfg.method]
    if cfg.lr is None or method.default_lr is None or cfg.lr <= LR_WARN * method.default_lr:
        return None
    return (f"warning: `lr` {cfg.lr:g} is {cfg.lr / method.default_lr:.0f}x {cfg.method}'s measured default "
            f"{method.default_lr:g}; if the loss rises or the gradient norm grows, lower it")


def mark_head_trainable(model: nn.Module) -> list[str]:
    """Make a classifier's freshly initialised head (``classifier``/``score`` modules) trainable;
    it is saved with the adapter. Returns the parameter names."""
    names = [n for n, p in model.named_parameters() if any(part in ("classifier", "score") for part in n.split("."))]
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(True)
    return names


def starts_at_base(cfg: RunConfig) -> bool:
    """Whether the run's model before training computes what the float32 base computes (to float32
    rounding, which the start check bounds by 1e-4): full fine-tuning, or an exact-start method
    (:attr:`~pissa.methods.registry.Method.exact_start`) on a float32 base without ``quantize``."""
    exact = not METHODS[cfg.method].adapter or (METHODS[cfg.method].exact_start and cfg.adapter.quantize is None)
    return exact and cfg.dtype == "float32"
