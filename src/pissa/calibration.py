"""``pissa calibrate``: one streamed pass over data for the statistics that data-aware methods read.

:func:`calibrate` runs the model over batches of tokens with a forward pre-hook on every target
layer. Each hook adds its input's non-padding rows ``X (n_b, in)`` to float32 sums

    S += X^T X,   m += X^T 1,   n += n_b          (cov = S / n, mean = m / n at the end)

once per distinct input tensor: layers fed the very same tensor in a forward (q/k/v, gate/up)
share one entry, found by tensor identity within the pass. Nothing of a batch outlives it: the
sums are the only state, ``in x in`` per distinct input.

With ``gradients=True`` each batch also runs backward on the summed loss of its target tokens
(:func:`pissa.objective.loss_sum`). The base weights never require grad: a hook on each target
layer's output adds ``g^T x`` (the loss gradient w.r.t. W, (out, in)) to that layer's running
sum as soon as autograd reaches it, so besides the sums autograd holds no weight gradient at all.
At the end ``grad = sum / n_target``, the gradient of the mean loss (LoRA-GA, LoRA-SB).

Under torchrun each rank takes every world-th batch and the sums are all-reduced
(:func:`pissa.distributed.sum_tensors`), so the result equals one process's up to summation order.
Statistics are written as safetensors with the model fingerprint and the data's digest
(:mod:`pissa.stats`); a file with the same fingerprint and digest is reused, not recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data as data_mod
from . import distributed, hub, options
from .config import CalibrateConfig
from .devices import resolve_device, torch_dtype
from .errors import PissaError
from .model import find_targets
from .modules import dense_weight
from .objective import Batch, Kind, collate, encode_all, loss_sum
from .stats import Calibration, fingerprint_of, layer_digest, open_calibration


def data_digest(batches: Sequence[Batch]) -> str:
    """SHA-256 (hex, 32 characters) of the batches' token ids, attention masks and target masks, in order."""
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.target_mask):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


def as_batch(b: Batch | dict[str, Tensor]) -> Batch:
    """A :class:`~pissa.objective.Batch`, or a dict with ``input_ids`` and optionally ``attention_mask`` and
    ``labels`` (-100: not a target; without labels every non-padding token after the first is one)."""
    if isinstance(b, Batch):
        return b
    ids = b["input_ids"]
    attn = b.get("attention_mask", torch.ones_like(ids))
    target = b["labels"] != -100 if "labels" in b else attn.bool()
    target = target.clone()
    target[:, 0] = False
    return Batch(ids, attn, target, torch.full((len(ids),), -1))


class _Sums:
    """The running sums of one pass (see the module docstring)."""

    def __init__(self, model: nn.Module, names: list[str], gradients: bool) -> None:
        self.modules = {n: model.get_submodule(n) for n in names}
        self.gradients = gradients
        self.input_of: dict[str, str] = {}  # layer -> its input's key (the first layer that read it)
        self.cov: dict[str, Tensor] = {}
        self.mean: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self.grad: dict[str, Tensor] = {}
        self.mask: Tensor | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}

    def start_batch(self, mask: Tensor) -> None:
        self.mask = mask.bool()
        self._seen.clear()

    def rows(self, x: Tensor) -> Tensor:
        """The non-padding rows of a layer input ``x (B, T, in)`` as ``(n, in)``."""
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            return x[self.mask]
        return x.reshape(-1, x.shape[-1])

    def pre_hook(self, name: str) -> Callable[[nn.Module, tuple], tuple | None]:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            seen = self._seen.get(id(x))
            key = seen[1] if seen is not None and seen[0]() is x else None
            if key is None:
                key = name
                self._seen[id(x)] = (weakref.ref(x), key)
                with torch.no_grad():
                    self._add(key, self.rows(x.detach()))
            if self.input_of.setdefault(name, key) != key:
                raise PissaError(f"layer {name!r} read a different shared input in another batch; "
                                 "calibrate it on its own (--targets)")
            if self.gradients and torch.is_grad_enabled() and not x.requires_grad:
                return (x.detach().requires_grad_(True), *args[1:])  # so that gradients reach this layer's output
            return None

        return hook

    def _add(self, key: str, X: Tensor) -> None:
        X = X.float()
        if key not in self.cov:
            d = X.shape[-1]
            self.cov[key] = X.new_zeros(d, d)
            self.mean[key] = X.new_zeros(d)
            self.count[key] = 0
        self.cov[key].addmm_(X.T, X)
        self.mean[key].add_(X.sum(0))
        self.count[key] += X.shape[0]

    def out_hook(self, name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if not (self.gradients and isinstance(out, Tensor) and out.requires_grad):
                return
            x = args[0].detach()

            def add(g: Tensor) -> None:  # dL/dW = g^T x in (out, in), whatever the layer's storage layout
                G = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                if name in self.grad:
                    self.grad[name].add_(G)
                else:
                    self.grad[name] = G

            out.register_hook(add)

        return hook


def calibrate(
    model: nn.Module,
    batches: Iterable[Batch | dict[str, Tensor]],
    *,
    targets: str | list[str] = "all-linear",
    gradients: bool = False,
    kind: Kind = "causal-lm",
    out: str | Path | None = None,
    progress: bool = False,
) -> Calibration:
    """Per-layer statistics of ``model`` over ``batches`` (see the module docstring).

    ``batches``: :class:`~pissa.objective.Batch` objects or dicts of ``input_ids (B, T)``,
    ``attention_mask (B, T)`` (padding is left out) and ``labels`` (gradient mode: -100 masks a
    token out of the loss). ``gradients``: also the mean loss gradient w.r.t. each target weight.
    ``out``: a safetensors file; if it already holds statistics of this model (fingerprint) on
    these batches (digest) with what is asked for, they are returned without a pass; else the new
    ones are written there (by rank 0). Under torchrun every rank passes all the batches and
    processes its share; every rank returns the whole statistics.
    """
    if gradients and kind != "causal-lm":
        raise PissaError("gradient statistics need a causal LM: a classifier's head is drawn when fine-tuning starts")
    batch_list = [as_batch(b) for b in batches]
    if not batch_list:
        raise PissaError("calibration needs at least one batch of data")
    rank, size = distributed.world()
    if len(batch_list) < size:
        raise PissaError(f"{len(batch_list)} calibration batches cannot be shared by {size} processes; "
                         "add samples or use fewer processes")
    names = find_targets(model, targets)
    layers = {}
    for n in names:
        W = dense_weight(model.get_submodule(n)).detach()
        layers[n] = {"shape": list(W.shape), "digest": layer_digest(W)}
    fingerprint, digest = fingerprint_of(layers), data_digest(batch_list)
    if out is not None and Path(out).is_file():
        cached = open_calibration(out)
        if (cached.fingerprint, cached.data_digest) == (fingerprint, digest) and (cached.has_gradients or not gradients) \
                and set(names) <= set(cached.layers):
            return cached
    sums = _Sums(model, names, gradients)
    handles = []
    for n, m in sums.modules.items():
        handles.append(m.register_forward_pre_hook(sums.pre_hook(n)))
        handles.append(m.register_forward_hook(sums.out_hook(n)))
    device = next(model.parameters()).device
    was_training = model.training
    requires = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)  # autograd makes no weight gradient: the output hooks form g^T x themselves
    mine = batch_list[rank::size]
    n_targets = 0
    bar = tqdm(mine, desc="calibrating", unit="batch", disable=not progress or rank != 0)
    try:
        for b in bar:
            b = b.to(device)
            sums.start_batch(b.attention_mask)
            if gradients:
                with torch.enable_grad():
                    loss_sum(model, b, kind).backward()
                n_targets += int(b.target_mask[:, 1:].sum())
            else:
                with torch.no_grad():
                    model(**b.inputs())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p, flag in requires:
            p.requires_grad_(flag)
        bar.close()
    keys = sorted(sums.cov)
    totals = torch.tensor([float(sums.count[k]) for k in keys] + [float(n_targets)], dtype=torch.float64)
    shapes = {n: tuple(dense_weight(m).shape) for n, m in sums.modules.items()}
    grads = [sums.grad.setdefault(n, torch.zeros(shapes[n], device=device)) for n in names] if gradients else []
    distributed.sum_tensors([*(sums.cov[k] for k in keys), *(sums.mean[k] for k in keys), *grads, totals])
    counts = dict(zip(keys, totals.tolist()))
    tensors: dict[str, Tensor] = {}
    for k in keys:  # the sums become the statistics in place: no second copy of them
        tensors[f"{k}.cov"] = sums.cov.pop(k).div_(counts[k]).cpu()
        tensors[f"{k}.mean"] = sums.mean.pop(k).div_(counts[k]).cpu()
    if gradients:
        total = max(1.0, float(totals[-1]))
        for n in names:
            tensors[f"{n}.grad"] = sums.grad.pop(n).div_(total).cpu()
    for n in names:
        layers[n]["input"] = sums.input_of[n]
    info = {"fingerprint": fingerprint, "data_digest": digest, "batches": len(batch_list),
            "examples": sum(len(b.input_ids) for b in batch_list), "tokens": int(max(counts.values())),
            "target_tokens": int(totals[-1]), "gradients": gradients}
    result = Calibration(layers=layers, info=info, tensors=tensors)
    if out is not None:
        if distributed.is_main():
            result.save(out)
        else:
            result.path = Path(out)
        distributed.barrier()
    return result


def calibration_batches(tokenizer: Any, data: str | data_mod.Dataset, kind: Kind, samples: int, batch_size: int,
                        max_length: int, *, val_size: int = 0) -> list[Batch]:
    """The first ``samples`` examples of ``data``'s training split, tokenized as fine-tuning does, in batches
    (each ``input_ids (B, T)``, B <= ``batch_size``, T <= ``max_length``).

    ``data``: a dataset name, split as ``pissa finetune --val-size val_size`` splits it
    (:func:`pissa.data.load_data`), or a :class:`~pissa.data.Dataset` already split so.
    """
    dataset = data_mod.load_data(data, val_size) if isinstance(data, str) else data
    if samples > len(dataset.train):
        raise PissaError(f"--samples {samples} exceeds the {len(dataset.train)} training examples of {dataset.name}; "
                         "pass fewer")
    items = encode_all(tokenizer, dataset.train[:samples], dataset.labels, kind, max_length)
    pad = int(tokenizer.pad_token_id)
    return [collate(items[i : i + batch_size], pad, kind) for i in range(0, len(items), batch_size)]


def command_calibrate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa calibrate --model M --data D --samples N --out STATS [--gradients] [--val-size V]``."""
    options.add_options(parser, CalibrateConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = options.resolve(CalibrateConfig, args)
        distributed.init_from_env()
        torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        kind = hub.resolve_kind(cfg.model, cfg.kind)
        if cfg.gradients and kind != "causal-lm":
            raise PissaError("--gradients needs a causal LM: a classifier's head is drawn when fine-tuning starts")
        if Path(cfg.out).is_dir():
            raise PissaError(f"--out {cfg.out} is a folder; pass a file name such as {Path(cfg.out) / 'stats.safetensors'}")
        model, tokenizer = hub.load_model(cfg.model, kind=kind, dtype=torch_dtype(cfg.dtype))
        nn.Module.to(model, device)
        batches = calibration_batches(tokenizer, cfg.data, kind, cfg.samples, cfg.batch_size, cfg.max_length,
                                      val_size=cfg.val_size)
        start = time.perf_counter()
        before = Path(cfg.out).stat().st_mtime_ns if Path(cfg.out).is_file() else None
        stats = calibrate(model, batches, targets=cfg.targets, gradients=cfg.gradients, kind=kind, out=cfg.out,
                          progress=True)
        reused = before is not None and Path(cfg.out).stat().st_mtime_ns == before
        if distributed.is_main():
            inputs = len({e["input"] for e in stats.layers.values()})
            what = "reused" if reused else f"wrote in {time.perf_counter() - start:.1f} s"
            print(f"{what} {cfg.out}: {len(stats.layers)} layers, {inputs} distinct inputs, {stats.info['tokens']} tokens"
                  + (", gradients" if stats.has_gradients else ""))
        return 0

    return run
