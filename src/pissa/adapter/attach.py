"""attach / merge: put adapters into a model and take them out again.

``attach`` finds the target layers, decomposes their weights (equal shapes batched together),
and swaps each layer for a :class:`~pissa.adapter.layer.PissaLinear` of the method's adapter shape
(:mod:`pissa.adapter.shapes`) whose residual is ``W - initial`` (low-rank: ``W - scaling * B0 @ A0``).
Everything but the trainable tensors is frozen.
"""

from __future__ import annotations

import dataclasses
import gc
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pissa.adapter.base_layers import dense_weight, native_weight, set_dense_weight
from pissa.adapter.config import AdapterConfig
from pissa.adapter.layer import PissaLinear
from pissa.adapter.quantized import quantize_residual
from pissa.adapter.shapes import SHAPES
from pissa.adapter.targets import find_targets
from pissa.errors import PissaError
from pissa.files.digests import weight_digest
from pissa.files.statistics import Calibration, open_calibration
from pissa.methods.data_aware import eva_ranks
from pissa.methods.factors import Factors, Init
from pissa.methods.inputs import InitOptions, Need, Stats, calibration_hint, layer_seed
from pissa.methods.qpissa import refine
from pissa.methods.quantize import check_quantizable, quantizer
from pissa.methods.registry import ADAPTERS, Decomposition, check_weight, get_method, init_structured, method_rank
from pissa.methods.svd import CHUNK_BYTES, MatrixBatch, compute_dtype, stack
from pissa.runtime import distributed
from pissa.runtime.memory import (
    free_blas_buffers,
    mapped_copy,
    release_paged_in,
    release_spans,
    resident_file_pages,
    spans_of,
    trim_heap,
)

BATCH_BYTES = 1 << 29
"""Equal-shape weights are decomposed in batches of at most this many bytes of float32 (512 MiB)."""

CPU_BATCH_BYTES = 2 * CHUNK_BYTES
"""On the CPU, batches hold at most this many bytes of float32 (8 MiB, two of SmolLM2's MLP weights): a batch's
weights are still in the cache when their residuals are formed right after its decomposition
(:data:`pissa.methods.svd.CHUNK_BYTES`)."""
GIVE_BACK_BYTES = 1 << 26
"""attach gives the memory of replaced weights back (pages released, heap trimmed) whenever this many bytes of
them (64 MiB) were replaced since the last time, so that neither they nor the decompositions' workspace pile up
over the batches (a 512 MiB batch of SmolLM2's 60 MLP weights lifted a bfloat16 run's peak above its load's)."""

ADAPT_HOOKS: list[Callable[[nn.Module, bool], None]] = []
"""Each is called as ``hook(model, adapted)`` at the end of attach / load_adapter (True) and of merge
(False); :mod:`pissa.integrations.trainer` adds the one that makes a Hugging Face model's ``save_pretrained``
write its adapter."""


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, PissaLinear]]:
    """(name, layer) for every adapted layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, PissaLinear):
            yield name, module


def _batches(names: list[str], weights: dict[str, Tensor], ranks: Mapping[str, int],
             batched: bool = True) -> Iterator[list[str]]:
    """Group layer names by (shape, rank, dtype, device), each group cut to at most BATCH_BYTES of float32
    (CPU_BATCH_BYTES on the CPU; to single layers when not ``batched``: :attr:`~pissa.methods.registry.Method.batched`)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for n in names:
        W = weights[n]
        groups[(tuple(W.shape), ranks[n], W.dtype, W.device)].append(n)
    for (shape, _, _, device), group in groups.items():
        cap = CPU_BATCH_BYTES if device.type == "cpu" else BATCH_BYTES
        per = max(1, cap // (4 * shape[0] * shape[1])) if batched else 1
        for i in range(0, len(group), per):
            yield group[i : i + per]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def attach(model: nn.Module, cfg: AdapterConfig, *, progress: bool = False) -> nn.Module:
    """Adapt ``model`` in place and return it; only the adapters' trainable tensors remain trainable.

    A Conv2d kernel ``(out, in, kh, kw)`` is adapted as its matrix ``W (out, in * kh * kw)``. Low-rank methods:
    for each target layer with weight ``W (out, in)``: ``(A, B) = method(W)`` in float32
    (float64 for float64 weights), stored as ``A0 = A / sqrt(s)``, ``B0 = B / sqrt(s)`` in
    ``cfg.factor_dtype`` (``s = alpha / rank``) so that ``s * B0 @ A0 = B @ A``; the residual
    ``W - s * B0 @ A0`` is cast back to W's dtype. At init the outputs equal the base's up to
    the rounding of that cast (fp32: ~1e-7 relative; bf16: a few 1e-2 on SmolLM2). Methods with a core
    (``B @ core @ A``) keep A and B as returned and store ``core0 = core / s`` instead
    (:meth:`~pissa.adapter.shapes.Shape.scaled`); only the parts the method names train. Other shapes: the same
    with their own tensors (:mod:`pissa.adapter.shapes`).
    """
    if any(True for _ in adapted_layers(model)):
        raise PissaError("this model already has pissa adapters; call pissa.merge(model) first or start from the base model")
    method = get_method(cfg.method)
    if not method.adapter:
        trains = "a compressed model's own low-rank factors" if method.compressed else "every weight"
        raise PissaError(f"method {cfg.method!r} trains {trains} and makes no adapter; attach one of: {', '.join(ADAPTERS)}")
    names = find_targets(model, cfg.targets)
    modules = {n: model.get_submodule(n) for n in names}
    weights = {n: dense_weight(m).detach() for n, m in modules.items()}
    calibration, needs = statistics_for(cfg)
    if calibration is not None:
        for n in names:
            calibration.check(n, weights[n])
    cfg, ranks = layer_ranks(cfg, {n: tuple(weights[n].shape) for n in names}, calibration)
    names = [n for n in names if ranks[n] > 0]
    if not names:
        raise PissaError("every target layer has rank 0 (rank_pattern); nothing to adapt")
    for n in sorted(names, key=lambda n: min(weights[n].shape)):  # a too-large rank names the smallest layer
        check_weight(weights[n], ranks[n], f"layer {n!r}")
    if cfg.quantize is not None and (conv := next((n for n in names if isinstance(modules[n], nn.Conv2d)), None)):
        raise PissaError(f"layer {conv!r} is a Conv2d and quantize={cfg.quantize!r} makes linear residuals only; "
                         "leave convolutions out of `targets` or drop `quantize`")
    if cfg.quantize is not None:
        check_quantizable(cfg.quantize)
    batches = list(_batches(names, weights, ranks, method.batched))
    bar = tqdm(total=len(names), desc="decomposing", unit="layer", disable=not progress)

    def factorize(batch: list[str]) -> Init:
        stats = calibration.stats(batch, needs) if calibration is not None and needs else None
        return initial_factors([weights[n] for n in batch], cfg, [layer_seed(cfg.seed, n) for n in batch],
                               rank=ranks[batch[0]], stats=stats, names=batch)

    released: list[tuple[int, int]] = []
    pending = 0  # bytes of weights replaced since the last give_back
    resident = resident_file_pages()
    costs = [len(b) * weights[b[0]].numel() for b in batches]
    # under torch.distributed each rank factorizes a share of the batches; all receive every result
    for batch, factors in distributed.shared_map(batches, factorize, costs):
        for i, n in enumerate(batch):
            init = factors.layer(i).to(cfg.torch_factor_dtype)
            module, W = modules.pop(n), weights.pop(n)  # the replaced weight is freed here, not when attach returns
            digest = weight_digest(native_weight(module))
            set_module(model, n, _make_layer(module, W, init, cfg, digest, released=released))
            pending += W.numel() * W.element_size()
            del module, W
            bar.update(1)
        del factors
        if pending >= GIVE_BACK_BYTES:
            give_back(released)
            pending = 0
    give_back(released)
    bar.close()
    release_paged_in(resident)  # the decomposition's code (LAPACK kernels), read once
    del resident
    gc.collect()  # the batches' factors in reference cycles go before the heap is trimmed
    free_blas_buffers()  # the LAPACK workspace MKL keeps after the SVDs
    trim_heap()
    return _freeze_base(model, cfg)


def give_back(released: list[tuple[int, int]]) -> None:
    """Return to the system the memory of weights just replaced: the memory-mapped checkpoint's pages of the byte
    ranges ``released`` (emptied; :func:`~pissa.runtime.memory.release_spans`) and the C heap's free pages, where the
    replaced weights of a converted (e.g. bfloat16) base and the SVD workspace went (:func:`~pissa.runtime.memory.trim_heap`)."""
    release_spans(released)
    released.clear()
    trim_heap()


def statistics_for(cfg: AdapterConfig) -> tuple[Calibration | None, tuple[Need, ...]]:
    """The calibration statistics ``cfg`` needs and what of them: the method's :attr:`~pissa.methods.registry.Method.needs`,
    plus the covariance for QPiSSA's activation-weighted last step when ``cfg.calibration`` is given with
    ``quantize``; ``(None, ())`` when nothing is read. A method that needs statistics without a file is a PissaError."""
    method = get_method(cfg.method)
    needs = tuple(n for n in method.needs if n != "weight")
    if cfg.calibration is None:
        if needs:
            what = "the loss gradient" if "gradient" in needs else "activation statistics"
            raise PissaError(f"method {cfg.method!r} reads {what}: " + calibration_hint(needs[0])
                             + "; pissa compare makes them from its own training split by itself")
        return None, ()
    if cfg.quantize is not None and method.qpissa and "covariance" not in needs:
        needs += ("covariance",)
    return (open_calibration(cfg.calibration), needs) if needs else (None, ())


def layer_ranks(cfg: AdapterConfig, shapes: Mapping[str, tuple[int, ...]],
                calibration: Calibration | None) -> tuple[AdapterConfig, dict[str, int]]:
    """Each target layer's rank (:meth:`AdapterConfig.layer_rank`; 0: not adapted; a full-rank method's layer:
    ``min(out, in)`` of its matrix in ``shapes``, :func:`~pissa.methods.registry.method_rank`) and the config that
    reproduces them. A method that allocates ranks from the statistics (EVA, :func:`~pissa.methods.data_aware.eva_ranks`)
    redistributes them: the returned config then holds the resulting ``rank_pattern`` and ``eva_rho = 1``."""
    names = list(shapes)
    ranks = {n: method_rank(cfg.method, shapes[n], cfg.layer_rank(n)) for n in names}
    if not get_method(cfg.method).allocates_ranks or calibration is None or cfg.eva_rho == 1:
        return cfg, ranks
    offered = max(int(round(cfg.eva_rho * r)) for r in ranks.values())
    ranks = eva_ranks(calibration.explained_variance(names, offered), ranks, cfg.eva_rho)
    pattern = {**(cfg.rank_pattern or {}), **{n: r for n, r in ranks.items() if r != cfg.rank or cfg.rank_pattern}}
    return dataclasses.replace(cfg, rank_pattern=pattern or None, eva_rho=1.0), ranks


def initial_factors(W: MatrixBatch, cfg: AdapterConfig, seeds: list[int], rank: int | None = None,
                    stats: Stats | None = None, names: list[str] | None = None) -> Init:
    """The initial adapter of a batch of equal-shape weights ``W`` (L of ``(out, in)``) under ``cfg``
    at ``rank`` (default ``cfg.rank``), scaled for ``s = alpha / rank`` (:meth:`~pissa.adapter.shapes.Shape.scaled`),
    in float32 (float64 for float64 weights). With ``cfg.quantize`` low-rank factors are refined against the
    quantized residual (nf4 or int8: QPiSSA, :func:`pissa.methods.qpissa.refine`; its last step activation-weighted when ``stats``
    has a covariance). ``seeds[i]`` seeds matrix i's random draws; ``stats``: the batch's calibration statistics;
    ``names``: the batch's layer names (for errors)."""
    r = cfg.rank if rank is None else rank
    opt = InitOptions(seeds=seeds, svd=cfg.svd, niter=cfg.niter, block=cfg.block, stats=stats, damping=cfg.damping,
                      first_lr=cfg.first_lr, fraction=cfg.sparse_fraction, threshold=cfg.sparse_threshold,
                      kron_shape=cfg.kron_shape, kron_rule=cfg.kron_rule, kron_tau=cfg.kron_tau, names=names or ())
    if cfg.quantize is None:
        result = init_structured(W, r, cfg.method, opt)
    else:
        stacked = stack(W, compute_dtype(W[0].dtype))
        result = init_structured(stacked, r, cfg.method, opt)
        if stats is not None:
            opt = dataclasses.replace(opt, stats=stats.to(stacked.dtype, stacked.device))
        if isinstance(result, Factors):
            result = refine(stacked, result, cfg.method, cfg.quant_iters, opt, quantizer(cfg.quantize))
    init = result.init() if isinstance(result, Factors) else result
    return SHAPES[init.shape].scaled(init, cfg.scaling_for(init.rank))


def decompose(weight: Tensor, rank: int, method: str = "pissa", quantize: str | None = None, stats: Stats | None = None,
              **options) -> Decomposition:
    """Split ``weight (out, in)`` into trainable ``B (out, rank)``, ``A (rank, in)`` and a frozen residual.

    ``weight ≈ residual + B @ A`` (equal up to the residual's rounding to weight's dtype; with
    ``quantize="nf4"`` or ``"int8"``, up to the rounding of the quantized residual, returned dequantized). The same
    code path as :func:`attach` for one layer: ``options`` are any other :class:`AdapterConfig`
    fields (``svd``, ``niter``, ``block``, ``seed``, ``quant_iters``, ``alpha``...). A core is
    folded into B. Factors are float32 (float64 for a float64 weight); the residual has weight's dtype.
    ``stats``: the layer's calibration statistics for data-aware methods (``cov (in, in)``, ``mean (in,)``,
    ``grad (out, in)``). LoRA-SB does not offset the base: its residual is the weight itself and
    ``residual + B @ A`` is where its model starts, one approximated update away from the weight.
    A method of another adapter shape has no ``(A, B)``: a PissaError says to use :func:`attach`.
    """
    rank = method_rank(method, tuple(weight.shape), rank)
    check_weight(weight, rank)
    cfg = AdapterConfig(method=method, rank=rank, quantize=quantize, **options)  # type: ignore[arg-type]
    if quantize is not None:
        check_quantizable(quantize)
    init = initial_factors(weight.unsqueeze(0), cfg, [cfg.seed], stats=None if stats is None else stats.batched()).layer(0)
    shape = SHAPES[init.shape]
    scaling = cfg.scaling_for(init.rank)
    t = shape.start(init)
    if (pair := shape.pair(t, scaling)) is None:
        raise PissaError(f"method {method!r} makes a {init.shape} adapter, not factors B @ A; use pissa.attach")
    residual = shape.residual(weight, t, scaling)
    if quantize is not None:
        residual = quantizer(quantize)(residual)
    return Decomposition(A=pair[0], B=pair[1], residual=residual)


def _freeze_base(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Make the adapters' trainable tensors the only trainable parameters and record the config on the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapted_layers(model):
        for p in layer.trainable():
            p.requires_grad_(True)
    model.pissa_config = cfg  # type: ignore[assignment]
    for hook in ADAPT_HOOKS:
        hook(model, True)
    return model


def _make_layer(
    module: nn.Module, W: Tensor, init: Init, cfg: AdapterConfig, digest: str, is_residual: bool = False,
    residual_digest: str | None = None, tensors: dict[str, Tensor] | None = None, *, released: list[tuple[int, int]],
) -> PissaLinear:
    """Swap ``module``'s weight ``W (out, in)`` for its residual and wrap it; the one place a layer is built.

    ``init`` holds the method's initial tensors of the layer (scaled); ``tensors``: the layer's whole state
    instead (a saved adapter: trained values and frozen initial copies), which rebuilds the same residual.
    ``is_residual``: W already is the residual (a model written by ``pissa init``), keep it
    (quantized if ``cfg.quantize``), its digest ``residual_digest`` when known. ``released`` gets the byte range of
    a weight the layer replaced, for the caller to give back in one pass (:func:`pissa.runtime.memory.release_spans`).
    """
    shape = SHAPES[init.shape]
    t = shape.start(init) if tensors is None else tensors
    scaling = cfg.scaling_for(init.rank)
    residual = W if is_residual else shape.residual(W, t, scaling)
    if residual is not W and cfg.quantize is None:
        residual = mapped_copy(residual)  # outside the heap, as a memory-mapped checkpoint's weight is
    replaced = native_weight(module)
    if cfg.quantize is not None:
        module = quantize_residual(module, residual, cfg.quantize)
    elif residual is not W:
        set_dense_weight(module, residual)
    if native_weight(module) is not replaced:
        released += spans_of([replaced])  # given back by the caller, one pass for all layers (runtime.memory)
    layer = PissaLinear(module, shape, t, init.train, scaling, init.rank, cfg.dropout, init.meta)
    layer.base_digest = digest
    known = residual_digest if is_residual and cfg.quantize is None else None
    layer.residual_digest = known or getattr(module, "source_digest", None) or weight_digest(native_weight(module))
    layer.base_dtype = W.dtype
    return layer


def rebuild(
    model: nn.Module,
    cfg: AdapterConfig,
    layers: Mapping[str, tuple[Init, dict[str, Tensor]]],
    digests: Mapping[str, str],
    residual_ready: Mapping[str, str] | AbstractSet[str] = frozenset(),
) -> nn.Module:
    """Adapt ``model`` from saved layers ``{name: (facts as an Init without tensors, the layer's tensors)}``
    (used by load_adapter): each residual is rebuilt from the frozen tensors, bit-identical to attach's.

    Layers named in ``residual_ready`` already hold their residual and are wrapped as they are
    (a mapping gives each one's residual digest, which is then not recomputed: the weight may be
    on the meta device).
    """
    if any(True for _ in adapted_layers(model)):
        raise PissaError("this model already has pissa adapters; load the adapter into the original base model")
    released: list[tuple[int, int]] = []
    for n, (init, tensors) in layers.items():
        module = model.get_submodule(n)
        known = residual_ready.get(n) if isinstance(residual_ready, Mapping) else None
        layer = _make_layer(module, dense_weight(module).detach(), init, cfg, digests[n], n in residual_ready, known,
                            tensors, released=released)
        set_module(model, n, layer)
    release_spans(released)  # a memory-mapped checkpoint's pages of the replaced weights
    return _freeze_base(model, cfg)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (``W_res + s * B @ A``) and return the plain model."""
    layers = list(adapted_layers(model))
    if not layers:
        raise PissaError("this model has no pissa adapters to merge; call pissa.attach or pissa.load_adapter first")
    for name, layer in layers:
        set_module(model, name, layer.merged())
    if hasattr(model, "pissa_config"):
        del model.pissa_config
    for hook in ADAPT_HOOKS:
        hook(model, False)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with requires_grad, per layer: PiSSA/LoRA/MiLoRA/OLoRA ``r (in + out)``,
    SVFit ``r``, LoRA-XS ``r^2``, SORSA ``r (in + out) + r``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def regularization(model: nn.Module) -> Tensor:
    """The sum over adapted layers of their shape's penalty (:meth:`~pissa.adapter.shapes.Shape.penalty`; SORSA's
    orthonormality ``||B^T B - I||_F + ||A A^T - I||_F`` for layers with orthonormal factors): a 0-d tensor,
    differentiable when some layer has a penalty, a constant zero (``requires_grad=False``) otherwise.

    Add ``weight * pissa.regularization(model)`` to the loss (``pissa finetune --reg-weight``).
    """
    layers = [layer for _, layer in adapted_layers(model)]
    total = torch.zeros((), device=layers[0].weight.device if layers else None)
    for layer in layers:
        if (term := layer.shape.penalty(layer.tensors(), layer.facts)) is not None:
            total = total + term
    return total
