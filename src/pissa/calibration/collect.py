"""``pissa calibrate``: one streamed pass over data for the statistics that data-aware methods read.

:func:`calibrate` runs the model over batches of tokens with a forward pre-hook on every target
layer. Each hook adds its input's non-padding rows ``X (n_b, in)`` to float32 sums

    S += X^T X,   m += X^T 1,   n += n_b          (cov = S / n, mean = m / n at the end)

once per distinct input tensor: layers fed the very same tensor in a forward (q/k/v, gate/up)
share one entry, found by tensor identity within the pass. Nothing of a batch outlives it: the
sums are the only state, about ``in^2 / 2`` floats per distinct input: ``X^T X`` is symmetric, so
only its upper triangle is accumulated, in row strips (:func:`add_gram`, about 0.56 of the flops
and of the floats of the full product), and made whole one input at a time as it is written out.

Less work than the plain forward of the batches given, with the same sums up to float rounding:
the rows are regrouped by length before the pass (:func:`by_length`: right-padded rows, batches of
the same sizes, so little padding is computed), and in covariance mode the pass stops at the
output head (a causal LM's ``lm_head`` over the vocabulary, ~20% of a small model's flops),
whose input no target reads.

With ``gradients=True`` each batch also runs backward on the summed loss of its target tokens
(:func:`pissa.data.loss.loss_sum`). The base weights never require grad: a hook on each target
layer's output adds ``g^T x`` (the loss gradient w.r.t. W, (out, in)) to that layer's running
sum as soon as autograd reaches it, so besides the sums autograd holds no weight gradient at all.
At the end ``grad = sum / n_target``, the gradient of the mean loss (LoRA-GA, LoRA-SB).

Under torchrun each rank takes every world-th batch and the sums are all-reduced
(:func:`pissa.runtime.distributed.sum_tensors`), so the result equals one process's up to summation order.
Statistics are written as safetensors with the model fingerprint and the data's digest
(:mod:`pissa.files.statistics`); a file with the same fingerprint and digest is reused, not recomputed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pissa.adapter.base_layers import dense_weight
from pissa.adapter.targets import find_targets
from pissa.calibration.batches import as_batch, by_length, calibration_batches, data_digest
from pissa.calibration.config import CalibrateConfig
from pissa.data.batches import Batch
from pissa.data.loss import loss_sum
from pissa.errors import PissaError
from pissa.files.statistics import Calibration, fingerprint_of, layer_digest, open_calibration
from pissa.runtime import distributed, hub
from pissa.runtime.devices import resolve_device, torch_dtype
from pissa.runtime.hub import Kind

STRIP = 128
"""Rows per strip of :func:`add_gram` (128-192 are about equally fast on CPUs, 1 thread)."""


def gram_strips(d: int, like: Tensor) -> list[Tensor]:
    """Zeroed upper row strips of a ``(d, d)`` symmetric matrix S: strip j is ``S[i:i+b, i:]``, ``i = j b``."""
    return [like.new_zeros(min(STRIP, d - i), d - i) for i in range(0, d, STRIP)]


def add_gram(strips: list[Tensor], X: Tensor) -> None:
    """``S += X^T X`` on S's upper strips (:func:`gram_strips`) for ``X (n, d)``: ``S[i:i+b, i:] +=
    X[:, i:i+b]^T X[:, i:]``, ``(1 + b/d) / 2`` of the full product's flops."""
    for strip, i in zip(strips, range(0, X.shape[-1], STRIP)):
        strip.addmm_(X[:, i : i + STRIP].T, X[:, i:])


def gram_matrix(strips: list[Tensor]) -> Tensor:
    """The whole symmetric ``(d, d)`` matrix of upper strips (:func:`gram_strips`)."""
    d = strips[0].shape[-1]
    S = strips[0].new_empty(d, d)
    for strip, i in zip(strips, range(0, d, STRIP)):
        b = strip.shape[0]
        S[i : i + b, i:] = strip
        S[i + b :, i : i + b] = strip[:, b:].mT
    return S


class _Stop(Exception):
    """Raised by the output head's pre-hook: the rest of the forward is not needed."""


class _Sums:
    """The running sums of one pass (see the module docstring)."""

    def __init__(self, model: nn.Module, names: list[str], gradients: bool, covariance: bool = True) -> None:
        self.modules = {n: model.get_submodule(n) for n in names}
        self.gradients, self.covariance = gradients, covariance
        self.input_of: dict[str, str] = {}  # layer -> its input's key (the first layer that read it)
        self.cov: dict[str, list[Tensor]] = {}  # upper strips of X^T X (gram_strips)
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
                                 "calibrate it on its own (`targets`)")
            if self.gradients and torch.is_grad_enabled() and not x.requires_grad:
                return (x.detach().requires_grad_(True), *args[1:])  # so that gradients reach this layer's output
            return None

        return hook

    def _add(self, key: str, X: Tensor) -> None:
        if not self.covariance:
            self.count[key] = self.count.get(key, 0) + X.shape[0]
            return
        X = X.float()
        if key not in self.cov:
            d = X.shape[-1]
            self.cov[key] = gram_strips(d, X)
            self.mean[key] = X.new_zeros(d)
            self.count[key] = 0
        add_gram(self.cov[key], X)
        self.mean[key].add_(X.sum(0))
        self.count[key] += X.shape[0]

    def out_hook(self, name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if not (self.gradients and isinstance(out, Tensor) and out.requires_grad):
                return
            x = args[0].detach()

            def add(g: Tensor) -> None:  # dL/dW = g^T x in (out, in), whatever the layer's storage layout
                g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
                if name in self.grad:
                    self.grad[name].addmm_(g2.T, x2)
                else:
                    self.grad[name] = g2.T @ x2

            out.register_hook(add)

        return hook


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Stop


def calibrate(
    model: nn.Module,
    batches: Iterable[Batch | dict[str, Tensor]],
    *,
    targets: str | list[str] = "all-linear",
    gradients: bool = False,
    covariance: bool = True,
    kind: Kind = "causal-lm",
    out: str | Path | None = None,
    progress: bool = False,
) -> Calibration:
    """Per-layer statistics of ``model`` over ``batches`` (see the module docstring).

    ``batches``: :class:`~pissa.data.batches.Batch` objects or dicts of ``input_ids (B, T)``,
    ``attention_mask (B, T)`` (padding is left out) and ``labels`` (gradient mode: -100 masks a
    token out of the loss). ``gradients``: also the mean loss gradient w.r.t. each target weight.
    ``covariance=False`` (with ``gradients``): the gradients alone, all that LoRA-GA and LoRA-SB read
    (no ``X^T X`` work, and ``in x in`` floats less per distinct input).
    ``out``: a safetensors file; if it already holds statistics of this model (fingerprint) on
    these batches (digest) with what is asked for, they are returned without a pass; else the new
    ones are written there (by rank 0). Under torchrun every rank passes all the batches and
    processes its share; every rank returns the whole statistics (``reused``: found in ``out``, no pass made).
    """
    if gradients and kind != "causal-lm":
        raise PissaError("gradient statistics need a causal LM: a classifier's head is drawn when fine-tuning starts")
    if not (gradients or covariance):
        raise PissaError("calibrate with covariance=False collects gradients only; pass gradients=True")
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
                and (cached.has_covariance or not covariance) and set(names) <= set(cached.layers):
            cached.reused = True
            return cached
    sums = _Sums(model, names, gradients, covariance)
    handles = []
    for n, m in sums.modules.items():
        handles.append(m.register_forward_pre_hook(sums.pre_hook(n)))
        handles.append(m.register_forward_hook(sums.out_hook(n)))
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not gradients and isinstance(head, nn.Module) and all(m is not head for m in sums.modules.values()):
        handles.append(head.register_forward_pre_hook(_stop))
    device = next(model.parameters()).device
    was_training = model.training
    requires = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)  # autograd makes no weight gradient: the output hooks form g^T x themselves
    mine = by_length(batch_list)[rank::size]
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
                with torch.no_grad(), contextlib.suppress(_Stop):
                    model(**b.inputs())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p, flag in requires:
            p.requires_grad_(flag)
        bar.close()
    keys = sorted(sums.count)
    totals = torch.tensor([float(sums.count[k]) for k in keys] + [float(n_targets)], dtype=torch.float64)
    shapes = {n: tuple(dense_weight(m).shape) for n, m in sums.modules.items()}
    grads = [sums.grad.setdefault(n, torch.zeros(shapes[n], device=device)) for n in names] if gradients else []
    distributed.sum_tensors([*(t for k in sums.cov for t in sums.cov[k]), *sums.mean.values(), *grads, totals])
    counts = dict(zip(keys, totals.tolist()))
    tensors: dict[str, Tensor] = {}
    for k in keys if covariance else []:
        tensors[f"{k}.mean"] = sums.mean.pop(k).div_(counts[k]).cpu()
    if gradients:  # the sums become the statistics in place: no second copy of them
        total = max(1.0, float(totals[-1]))
        for n in names:
            tensors[f"{n}.grad"] = sums.grad.pop(n).div_(total).cpu()
    covs = {f"{k}.cov": k for k in keys if covariance}
    whole = lambda name: gram_matrix(sums.cov[covs[name]]).div_(counts[covs[name]]).cpu()
    for n in names:
        layers[n]["input"] = sums.input_of[n]
    info = {"fingerprint": fingerprint, "data_digest": digest, "batches": len(batch_list),
            "examples": sum(len(b.input_ids) for b in batch_list), "tokens": int(max(counts.values())),
            "target_tokens": int(totals[-1]), "gradients": gradients,
            "covariance": covariance}
    if out is None:
        for name, k in covs.items():
            tensors[name] = whole(name)
            del sums.cov[k]
        return Calibration(layers=layers, info=info, tensors=tensors)
    # written one whole covariance at a time, then read back from the file on demand
    result = Calibration(layers=layers, info=info, tensors=_Lazy(tensors, covs, whole))
    if distributed.is_main():
        result.save(out)
    else:
        result.path = Path(out)
    distributed.barrier()
    result.tensors = {}
    return result


class _Lazy(Mapping):
    """``tensors`` plus the names in ``made``, each computed by ``make(name)`` when read."""

    def __init__(self, tensors: dict[str, Tensor], made: Mapping[str, Any], make: Callable[[str], Tensor]) -> None:
        self.tensors, self.made, self.make = tensors, made, make

    def __getitem__(self, name: str) -> Tensor:
        return self.make(name) if name in self.made else self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self.tensors, *self.made])

    def __len__(self) -> int:
        return len(self.tensors) + len(self.made)


def calibrate_model(cfg: CalibrateConfig) -> Calibration:
    """``pissa calibrate``: load ``cfg.model``, encode the first ``cfg.samples`` training examples of ``cfg.data``
    (split as ``pissa finetune --val-size`` splits it) and :func:`calibrate` it into ``cfg.out``."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    kind = hub.resolve_kind(cfg.model, cfg.kind)
    if cfg.gradients and kind != "causal-lm":
        raise PissaError("`gradients` needs a causal LM: a classifier's head is drawn when fine-tuning starts")
    if Path(cfg.out).is_dir():
        raise PissaError(f"`out` {cfg.out} is a folder; pass a file name such as {Path(cfg.out) / 'stats.safetensors'}")
    model, tokenizer = hub.load_model(cfg.model, kind=kind, dtype=torch_dtype(cfg.dtype))
    nn.Module.to(model, device)
    batches = calibration_batches(tokenizer, cfg.data, kind, cfg.samples, cfg.batch_size, cfg.max_length,
                                  val_size=cfg.val_size, columns=cfg.columns, split_name=cfg.data_split)
    return calibrate(model, batches, targets=cfg.targets, gradients=cfg.gradients, kind=kind, out=cfg.out, progress=True)
