"""``pissa analyze quant-error``: how much of NF4's (or LLM.int8's) quantization error QPiSSA and LoftQ remove.

For every adapted layer ("all-linear") of a model and a rank r, the paper's reduction ratio
(:func:`reduction_ratio`, nuclear norm; QLoRA = 0 by definition) of

    LoftQ-T   Q = nf4(W), then T alternations                         (Li et al., 2023)
    QPiSSA-T  the same alternation from PiSSA's B A, T quantizations   (PiSSA paper, Algorithm 1)

both measured on their final pair ``(Q_T, B_T A_T)``, whose last step is the SVD step (the
pair a QPiSSA model holds at init, :func:`pissa.methods.qpissa.refine`).

for each T in ``--iters``. ``--quantize int8`` puts LLM.int8 (:mod:`pissa.methods.int8`) in place of nf4
everywhere, the baseline included: the ratios are then against ``int8(W)``. With ``--calibration STATS``
(``pissa calibrate``) a second table gives the activation-weighted reduction
``(1 - ||(W - Q - B A) L||_F / ||(W - nf4(W)) L||_F) x 100``,
``L L^T = X^T X / n`` (so ``||M L||_F = ||M X^T||_F / sqrt(n)`` over the calibration inputs X), of the
same methods plus EoRA on nf4(W) (``B A`` = :func:`~pissa.methods.data_aware.eora_fit` of ``W - nf4(W)``) and
QPiSSA+EoRA-T (QPiSSA's ``Q_T`` with the activation-weighted last step, what ``quantize="nf4"``
with statistics gives). Equal-shape layers run as one batch; the rank-r SVDs are exact
(LAPACK) unless ``--svd krylov``. Output: a markdown table per projection type (the module name
after its layer index, e.g. ``self_attn.q_proj``) and on average over all layers, printed and
written with a per-layer CSV and a bar chart PNG into ``--out``.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pissa.adapter.base_layers import dense_weight
from pissa.adapter.targets import find_targets
from pissa.analysis.config import QuantErrorConfig
from pissa.analysis.tables import Report
from pissa.errors import PissaError
from pissa.files.statistics import open_calibration
from pissa.methods.data_aware import eora_fit
from pissa.methods.inits import pissa_init
from pissa.methods.inputs import InitOptions, Stats, layer_seed
from pissa.methods.nf4 import nf4
from pissa.methods.qpissa import loftq_iterates, qpissa_iterates
from pissa.methods.quantize import Quantizer, check_quantizable, quantizer
from pissa.methods.svd import SVDMethod
from pissa.runtime import hub
from pissa.runtime.devices import resolve_device

CHUNK = 8
"""Matrices of one shape processed together (bounds memory: a few copies of CHUNK weights)."""


def nuclear_norm(E: Tensor) -> Tensor:
    """``||E||_*`` (sum of singular values) of each matrix of ``E (..., m, n)``, in float64.

    From the eigenvalues of the float64 Gram matrix of the smaller side: the same value as
    ``torch.linalg.svdvals(E.double()).sum(-1)`` to ~1e-12 relative,
    for one Gram matrix and a symmetric eigensolve of the smaller side instead of an SVD.
    """
    M = E.double()
    if M.shape[-2] > M.shape[-1]:
        M = M.mT
    return torch.linalg.eigvalsh(M @ M.mT).clamp_min(0).sqrt().sum(-1)


def reduction_ratio(W: Tensor, Q: Tensor, A: Tensor, B: Tensor, qlora_error: Tensor | None = None,
                    quantize: Quantizer = nf4) -> Tensor:
    """The paper's ``(1 - ||W - (Q + B A)||_* / ||W - q(W)||_*) * 100`` per matrix of ``W (..., out, in)``,
    ``q = quantize`` (nf4, the paper's; int8).

    ``qlora_error``: ``||W - q(W)||_*`` if already known.
    """
    if qlora_error is None:
        qlora_error = nuclear_norm(W - quantize(W))
    return (1 - nuclear_norm(W - Q - B @ A) / qlora_error) * 100


def projection_type(name: str) -> str:
    """The part of a module name after its last numeric component
    (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``)."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1 :]) if idx and idx[-1] + 1 < len(parts) else name


def method_names(iters: Sequence[int]) -> list[str]:
    """Column names: QLoRA, LoftQ-T..., QPiSSA-T... for T in ``iters``."""
    return ["QLoRA"] + [f"LoftQ-{t}" for t in iters] + [f"QPiSSA-{t}" for t in iters]


def weighted_method_names(iters: Sequence[int]) -> list[str]:
    """Columns of the activation-weighted table: those of :func:`method_names`, EoRA, QPiSSA+EoRA-T."""
    return method_names(iters) + ["EoRA"] + [f"QPiSSA+EoRA-{t}" for t in iters]


def weighted_error(M: Tensor, cov: Tensor) -> Tensor:
    """``||M L||_F = sqrt(tr(M C M^T))`` per matrix of ``M (L, out, in)`` with ``C = cov (L, in, in)``, in float64."""
    M = M.double()
    return torch.einsum("loi,lij,loj->l", M, cov.double(), M).clamp_min(0).sqrt()


def batch_ratios(W: Tensor, rank: int, iters: Sequence[int], opt: InitOptions, cov: Tensor | None = None,
                 quantize: Quantizer = nf4) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Reduction ratios (%) of every method for a batch ``W (L, out, in)`` (float32) with the quantizer ``quantize``:
    ``{method: (L,)}``, and with the inputs' ``cov (L, in, in)`` the activation-weighted ones (else ``{}``)."""
    qlora_error = nuclear_norm(W - quantize(W))
    out = {"QLoRA": torch.zeros(W.shape[0], dtype=torch.float64)}
    weighted: dict[str, Tensor] = {}
    if cov is not None:
        wopt = dataclasses.replace(opt, stats=Stats(cov=cov))
        Q0 = quantize(W)
        base = weighted_error(W - Q0, cov)
        ratio = lambda Q, A, B: (1 - weighted_error(W - Q - B @ A, cov) / base) * 100
        weighted["QLoRA"] = torch.zeros(W.shape[0], dtype=torch.float64)
        weighted["EoRA"] = ratio(Q0, *eora_fit(W - Q0, rank, wopt))
    runs = (("LoftQ", loftq_iterates(W, rank, opt, quantize)),
            ("QPiSSA", qpissa_iterates(W, *pissa_init(W, rank, opt), opt, quantize)))
    for label, steps in runs:
        for t in range(1, max(iters) + 1):
            Q, A, B = next(steps)
            if t in iters:
                out[f"{label}-{t}"] = reduction_ratio(W, Q, A, B, qlora_error)
                if cov is not None:
                    weighted[f"{label}-{t}"] = ratio(Q, A, B)
                    if label == "QPiSSA":
                        weighted[f"QPiSSA+EoRA-{t}"] = ratio(Q, *eora_fit(W - Q, rank, wopt))
    return out, weighted


@dataclass(frozen=True)
class LayerRatios:
    name: str
    shape: tuple[int, int]
    ratios: dict[str, float]
    weighted: dict[str, float] = dataclasses.field(default_factory=dict)
    """Activation-weighted reduction ratios (with calibration statistics)."""

    @property
    def type(self) -> str:
        return projection_type(self.name)


def layer_ratios(
    weights: dict[str, Tensor],
    rank: int,
    iters: Sequence[int] = (1, 5),
    *,
    svd: SVDMethod = "exact",
    niter: int | None = None,
    seed: int = 0,
    progress: bool = False,
    covariances: dict[str, Tensor] | None = None,
    quantize: Quantizer = nf4,
) -> list[LayerRatios]:
    """The ratios of every layer ``{name: W (out, in)}``, equal shapes batched; in the input order.
    ``covariances``: each layer's input ``X^T X / n`` (in, in) for the activation-weighted ratios; ``quantize``: the
    quantizer (nf4, int8)."""
    for name, W in weights.items():
        if not 1 <= rank <= min(W.shape):
            raise PissaError(
                f"rank {rank} does not fit layer {name!r} of shape {tuple(W.shape)}; choose 1 <= rank <= {min(W.shape)}"
            )
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, W in weights.items():
        groups.setdefault(tuple(W.shape), []).append(name)
    results: dict[str, LayerRatios] = {}
    bar = tqdm(total=len(weights), desc=f"quant-error r={rank}", unit="layer", disable=not progress)
    for shape, names in groups.items():
        for i in range(0, len(names), CHUNK):
            chunk = names[i : i + CHUNK]
            W = torch.stack([weights[n].detach().float() for n in chunk])
            opt = InitOptions(seeds=[layer_seed(seed, n) for n in chunk], svd=svd, niter=niter)
            cov = None if covariances is None else torch.stack([covariances[n] for n in chunk]).to(W)
            ratios, weighted = batch_ratios(W, rank, iters, opt, cov, quantize)
            for j, n in enumerate(chunk):
                results[n] = LayerRatios(n, shape, {m: float(v[j]) for m, v in ratios.items()},  # type: ignore[arg-type]
                                         {m: float(v[j]) for m, v in weighted.items()})
            bar.update(len(chunk))
    bar.close()
    return [results[n] for n in weights]


def summarize(rows: list[LayerRatios], methods: list[str],
              weighted: bool = False) -> list[tuple[str, str, int, dict[str, float]]]:
    """``(type, shape, layers, {method: mean ratio})`` per projection type, then ``("average", "", n, ...)`` over all layers
    (of the activation-weighted ratios if ``weighted``)."""
    types: dict[str, list[LayerRatios]] = {}
    for row in rows:
        types.setdefault(row.type, []).append(row)

    def mean(group: list[LayerRatios]) -> dict[str, float]:
        return {m: sum((r.weighted if weighted else r.ratios)[m] for r in group) / len(group) for m in methods}

    table = [(t, "x".join(map(str, g[0].shape)), len(g), mean(g)) for t, g in types.items()]
    return table + [("average", "", len(rows), mean(rows))]


def markdown_table(summary: list[tuple[str, str, int, dict[str, float]]], methods: list[str]) -> str:
    """The summary as a markdown table of reduction ratios in %."""
    lines = ["| projection | shape | layers | " + " | ".join(methods) + " |", "|---|---|---:|" + "---:|" * len(methods)]
    for t, shape, n, means in summary:
        cells = " | ".join(f"{means[m]:.2f}" for m in methods)
        lines.append(f"| {'**average**' if t == 'average' else t} | {shape} | {n} | {cells} |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: list[tuple[str, str, int, dict[str, float]]], methods: list[str], title: str):
    """A grouped bar chart (one group per projection type and the average, one bar per method); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(summary)), 4.0))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(summary))]
        ax.bar(xs, [s[3][m] for s in summary], width, label=m)
    ax.set_xticks(range(len(summary)), [s[0] for s in summary], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("quantization error reduction (%)")
    ax.set_title(title)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def model_weights(model_name: str, kind: str = "auto", sample: int | None = None,
                  device: torch.device | None = None) -> dict[str, Tensor]:
    """The (out, in) float32 weights of a model's "all-linear" layers, on ``device`` (default: the CPU);
    ``sample``: at most that many per projection type, evenly spaced."""
    model, _ = hub.load_model(model_name, kind=hub.resolve_kind(model_name, kind))
    names = find_targets(model, "all-linear")
    if sample is not None:
        by_type: dict[str, list[str]] = {}
        for n in names:
            by_type.setdefault(projection_type(n), []).append(n)
        keep = set()
        for group in by_type.values():
            step = max(1, -(-len(group) // sample))
            keep.update(group[::step][:sample])
        names = [n for n in names if n in keep]
    return {n: dense_weight(model.get_submodule(n)).detach().to(device, torch.float32) for n in names}


def quant_error(args: QuantErrorConfig) -> Report:
    """``pissa analyze quant-error --model M --rank r [--iters 1,5] [--out DIR]``: tables, CSV and a bar chart."""
    check_quantizable(args.quantize)
    iters = sorted(set(args.iters))
    methods = method_names(iters)
    weights = model_weights(args.model, args.kind, args.sample, resolve_device(args.device))
    covariances: dict[str, Tensor] | None = None
    if args.calibration is not None:
        calibration = open_calibration(args.calibration)
        for n, W in weights.items():
            calibration.check(n, W)
        covariances = {n: calibration.stats([n], ["covariance"]).cov[0] for n in weights}  # type: ignore[index]
    start = time.perf_counter()
    rows = layer_ratios(weights, args.rank, iters, svd=args.svd, niter=args.niter, progress=True, covariances=covariances,
                        quantize=quantizer(args.quantize))
    seconds = time.perf_counter() - start
    summary = summarize(rows, methods)
    q = args.quantize
    title = f"{args.model}, rank {args.rank}: {q.upper()} error reduction (nuclear norm; QLoRA: {q}(W))"
    table = markdown_table(summary, methods)
    text = f"# {title}\n\n{len(rows)} layers, svd={args.svd}, {seconds:.0f} s\n\n{table}"
    wmethods = weighted_method_names(iters) if covariances is not None else []
    if wmethods:
        text += (f"\n## Activation-weighted error reduction (%), 1 - ||(W - Q - BA) X^T||_F / ||(W - {q}(W)) X^T||_F\n\n"
                 f"Calibration statistics {args.calibration} ({calibration.info['tokens']} tokens).\n\n"
                 + markdown_table(summarize(rows, wmethods, weighted=True), wmethods))
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["layer", "type", "shape", *methods, *(f"weighted {m}" for m in wmethods)])
    for r in rows:
        writer.writerow([r.name, r.type, "x".join(map(str, r.shape)), *(f"{r.ratios[m]:.4f}" for m in methods),
                         *(f"{r.weighted[m]:.4f}" for m in wmethods)])
    fig = bar_chart(summary, methods, title)
    return Report("quant_error", text, buf.getvalue(), fig)
