"""Adapter files: save / load (self-contained, fingerprinted), PEFT export, atomic writes.

An adapter directory holds

    adapter_config.json      {"format": "pissa-adapter", "version": 2, "config": AdapterConfig,
                              "layers": {name: {"in", "out", "base_digest", "residual_digest"}},
                              "base_fingerprint", "residual_fingerprint"}
    adapter.safetensors      {name}.lora_A (r, in), {name}.lora_B (out, r)   trained factors
                             {name}.A0 (r, in),     {name}.B0 (out, r)       initial factors
                             {name}.lora_core, {name}.core0 ((r,) or (r, r)) methods with a core
                             {name}.Ar (r, in),     {name}.Br (out, r)       QPiSSA residual factors

A layer's entry in "layers" also records ``train`` (its trainable parts) and ``orthonormal``
(absent in older files: A and B train, no core).

The initial factors rebuild the residual ``W - s * B0 @ A0`` bit-exactly from the original
base weights (the same :func:`~pissa.decompose.residual_of` as at attach), so no residual
model needs to be stored; a QPiSSA layer rebuilds its 4-bit residual ``nf4(W - s * Br @ Ar)``
from its residual factors instead (files without them load as before). No pickle anywhere; every
file and directory appears atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pissa.adapter.attach import adapted_layers, rebuild
from pissa.adapter.base_layers import dense_weight, is_adaptable, is_conv1d, native_weight
from pissa.adapter.layer import PissaLinear
from pissa.errors import PissaError
from pissa.files.digests import model_fingerprint, weight_digest
from pissa.methods.factors import Factors, fold_core, truncate
from pissa.methods.registry import METHODS
from pissa.runtime import distributed
from pissa.training.config import AdapterConfig

FORMAT = "pissa-adapter"
VERSION = 2
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"
"""Trainable parameters outside the adapters (a classifier head), when the model has any."""


def _umask_mode(mode: int) -> int:
    """``mode`` with the process umask applied (mkdtemp/mkstemp create private 0700/0600 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def replace_dir(src: Path, dst: Path) -> None:
    """Rename directory ``src`` to ``dst``; an existing ``dst`` is moved aside first, then deleted."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds.

    On error the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _layers_or_fail(model: nn.Module) -> list:
    layers = list(adapted_layers(model))
    if not layers:
        raise PissaError("this model has no pissa adapters; call pissa.attach(model, cfg) first")
    return layers


@dataclass
class AdapterContents:
    """Everything an adapter directory holds, gathered from a model (:func:`gather_adapter`)."""

    cfg: AdapterConfig
    tensors: dict[str, Tensor]
    meta: dict[str, dict[str, Any]]
    head: dict[str, Tensor]
    num_labels: int | None
    base: dict[str, str] | None

    def write(self, path: str | os.PathLike) -> Path:
        """Write the adapter directory ``path`` (replaced atomically)."""
        return write_adapter(path, self.cfg, self.tensors, self.meta, self.head, self.num_labels, self.base)


def gather_adapter(model: nn.Module) -> AdapterContents:
    """The model's adapters, on the CPU. For a model sharded over processes (FSDP2) this is a
    collective that every rank must call: each returns the whole adapter."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name, layer in _layers_or_fail(model):
        layer_tensors, meta[name] = layer_entry(name, layer)
        tensors.update(layer_tensors)
    head = {n: distributed.full(p.detach()).contiguous().cpu() for n, p in head_parameters(model).items()}
    num_labels = getattr(getattr(model, "config", None), "num_labels", None) if head else None
    base = getattr(model, "pissa_base", None)  # set by pissa.hub.load_model
    return AdapterContents(model.pissa_config, tensors, meta, head, num_labels, base)  # type: ignore[arg-type]


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters to directory ``path`` (replaced atomically); returns the path.

    Under torch.distributed only rank 0 writes. A model sharded over the processes (FSDP2) is
    gathered first (:func:`gather_adapter`): then every rank must call this.
    """
    contents = gather_adapter(model)
    return contents.write(path) if distributed.is_main() else Path(path)


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the adapted layers (e.g. a classification head), by name."""
    adapter = {id(p) for _, layer in adapted_layers(model) for p in layer.parameters()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter}


def layer_entry(name: str, layer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One adapted layer's share of an adapter directory: its tensors ``{name}.{key}`` and its "layers" entry."""
    tensors: dict[str, Tensor] = {}
    parts = [("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("A0", layer.A0), ("B0", layer.B0)]
    if layer.lora_core is not None:
        parts += [("lora_core", layer.lora_core), ("core0", layer.core0)]
    if layer.Ar is not None:
        parts += [("Ar", layer.Ar), ("Br", layer.Br)]
    for key, t in parts:
        tensors[f"{name}.{key}"] = distributed.full(t.detach()).contiguous().cpu()
    meta = {
        "in": layer.in_features,
        "out": layer.out_features,
        "base_digest": layer.base_digest,
        "base_dtype": str(layer.base_dtype).removeprefix("torch."),
        # a 4-bit residual records the digest of the dense residual it was quantized from (what `pissa init` writes)
        "residual_digest": layer.residual_digest,
        "train": list(layer.train_parts),
        "orthonormal": layer.orthonormal,
    }
    return tensors, meta


def write_adapter(
    path: str | os.PathLike,
    cfg: AdapterConfig,
    tensors: dict[str, Tensor],
    meta: dict[str, dict[str, Any]],
    head: dict[str, Tensor] | None = None,
    num_labels: int | None = None,
    base: dict[str, str] | None = None,
) -> Path:
    """Write an adapter directory from the :func:`layer_entry` parts of its layers (save_adapter, ``pissa init``).

    ``head``: trained parameters outside the adapters (``HEAD_FILE``, listed under "head"), with
    the classifier's ``num_labels``; ``base``: ``{"model": name or path, "kind": head}`` of the base.
    """
    doc = adapter_doc(cfg, meta, head, num_labels, base)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        if head:
            save_file(head, str(tmp / HEAD_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return Path(path)


def adapter_doc(
    cfg: AdapterConfig,
    meta: dict[str, dict[str, Any]],
    head: dict[str, Tensor] | None = None,
    num_labels: int | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``CONFIG_FILE`` document of an adapter: config, the base it was made from, per-layer entries and fingerprints."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_dict(),
        "layers": meta,
        "base_fingerprint": model_fingerprint({n: m["base_digest"] for n, m in meta.items()}),
        "residual_fingerprint": model_fingerprint({n: m["residual_digest"] for n, m in meta.items()}),
    }
    if base:
        doc["base_model"] = base
    if head:
        doc["head"] = sorted(head)
        doc["num_labels"] = num_labels
    return doc


def read_adapter_doc(path: str | os.PathLike) -> dict[str, Any]:
    """The validated config document (``CONFIG_FILE``) of an adapter directory."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise PissaError(f"{path} is not a pissa adapter directory (needs {CONFIG_FILE} and {TENSORS_FILE}); "
                         "pass the folder save_adapter wrote")
    try:
        doc = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise PissaError(f"{path / CONFIG_FILE} is not valid JSON ({e}); re-save the adapter") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise PissaError(f"{path} has format {doc.get('format')!r} v{doc.get('version')}; this pissa reads {FORMAT} v{VERSION}")
    return doc


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config document and tensors of an adapter directory, validated."""
    doc = read_adapter_doc(path)
    try:
        tensors = load_file(str(Path(path) / TENSORS_FILE))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise PissaError(f"{Path(path) / TENSORS_FILE} cannot be read ({e}); re-save the adapter") from None
    return doc, tensors


def base_description(doc: dict[str, Any]) -> str:
    """The base an adapter document records, for messages: ``smollm2 (causal-lm, fingerprint ...)``."""
    base = doc.get("base_model") or {}
    name = base.get("model", "the model it was created from")
    kind = f"{base['kind']}, " if base.get("kind") else ""
    return f"{name} ({kind}fingerprint {doc['base_fingerprint']})"


class RecordedBase(NamedTuple):
    """How to load the base of an adapter (:func:`recorded_base`)."""

    model: str
    kind: str
    num_labels: int | None
    dtype: torch.dtype
    """The dtype the base weights had (their digests cover it): load the base in it, then convert if need be."""


def recorded_base(path: str | os.PathLike, model: str | None, kind: str) -> RecordedBase:
    """How to load the base of the adapter at ``path``: the given model / kind, else the ones the
    adapter records, and the dtype of its base weights; a PissaError when neither names a model."""
    doc = read_adapter_doc(path)
    base = doc.get("base_model") or {}
    model = model or base.get("model")
    if model is None:
        raise PissaError(f"the adapter at {path} does not record its base model; pass --model")
    if kind == "auto":
        kind = base.get("kind") or "auto"
    return RecordedBase(model, kind, doc.get("num_labels"), _base_dtype(doc))


def _base_dtype(doc: dict[str, Any]) -> torch.dtype:
    """The base weights' dtype an adapter document records (float32 for adapters that predate the record)."""
    first: dict[str, Any] = next(iter(doc["layers"].values()), {})
    return getattr(torch, first.get("base_dtype", "float32"))


def load_adapter(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt ``base`` (the original model, unmodified) with the adapter at ``path``, in place.

    The base may also be the residual model that ``pissa init`` wrote. Refuses any other model.
    A base on the meta device is taken as that residual model, to be filled later
    (:func:`pissa.load_sharded` does both and checks the residual's digests).
    """
    doc, tensors = read_adapter(path)
    cfg = AdapterConfig.from_dict(doc["config"])
    factors: dict[str, Factors] = {}
    digests: dict[str, str] = {}
    residual_ready: dict[str, str] = {}
    for name, meta in doc["layers"].items():
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise PissaError(f"adapter at {path} was made for another model: layer {name!r} is missing here") from None
        W = dense_weight(module) if is_adaptable(module) else None
        if W is None or tuple(W.shape) != (meta["out"], meta["in"]):
            raise PissaError(f"adapter at {path} was made for another model: layer {name!r} has a different type or shape")
        if W.is_meta:  # a model built on the meta device: the residual checkpoint fills it (pissa.load_sharded)
            if cfg.quantize is not None:
                raise PissaError(f"adapter at {path} has a 4-bit residual (quantize={cfg.quantize}); it cannot be loaded "
                                 "onto a meta-device model: load the base model for real, then load_adapter")
            residual_ready[name] = meta["residual_digest"]
            digest = meta["residual_digest"]
        else:
            digest = weight_digest(native_weight(module))
        if digest == meta["residual_digest"]:
            residual_ready[name] = digest
        elif digest != meta["base_digest"]:
            recorded = meta.get("base_dtype", "float32")
            if str(W.dtype).removeprefix("torch.") != recorded:
                raise PissaError(f"adapter at {path} was made on a {recorded} base and this model's weights are "
                                 f"{str(W.dtype).removeprefix('torch.')}; load the base in {recorded} "
                                 f"(dtype=torch.{recorded}), adapt it, then convert")
            raise PissaError(
                f"adapter at {path} was made from a different base model (weights of {name!r} differ); "
                f"load it onto {base_description(doc)}"
            )
        factors[name] = Factors(
            A=tensors[f"{name}.A0"],
            B=tensors[f"{name}.B0"],
            core=tensors.get(f"{name}.core0"),
            train=tuple(meta.get("train", ("A", "B"))),
            orthonormal=bool(meta.get("orthonormal", False)),
            Ar=tensors.get(f"{name}.Ar"),
            Br=tensors.get(f"{name}.Br"),
        )
        digests[name] = meta["base_digest"]
    rebuild(base, cfg, factors, digests, residual_ready)
    with torch.no_grad():
        for name, layer in adapted_layers(base):
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
            if layer.lora_core is not None:
                layer.lora_core.copy_(tensors[f"{name}.lora_core"])
    if doc.get("head"):
        _load_head(base, Path(path), doc["head"])
    return base


def _load_head(model: nn.Module, path: Path, names: list[str]) -> None:
    """Copy the saved head parameters (``HEAD_FILE``) into ``model`` and make them trainable."""
    try:
        head = load_file(str(path / HEAD_FILE))
    except Exception as e:  # missing or corrupt file
        raise PissaError(f"{path / HEAD_FILE} cannot be read ({e}); re-save the adapter") from None
    params = dict(model.named_parameters())
    for n in names:
        if n not in params or n not in head or params[n].shape != head[n].shape:
            raise PissaError(f"adapter at {path} has a head parameter {n!r} this model lacks or shapes differently; "
                             "load the model with the same head (e.g. num_labels from adapter_config.json)")
        with torch.no_grad():
            params[n].copy_(head[n])
        params[n].requires_grad_(True)


def peft_factors(layer: PissaLinear, export_rank: Literal["r", "2r"]) -> tuple[Tensor, Tensor]:
    """PEFT LoRA factors of one layer's update ``s (B A - B0 A0) = s [B | -B0] [A ; A0]``.

    ``export_rank`` is the method's (:attr:`pissa.decompose.Method.export_rank`). A core is folded
    into the B side (``B C A - B0 C0 A0 = [B C | -B0 C0] [A ; A0]``). Rank r suffices when A is
    frozen, so A = A0 (SVFit, LoRA-XS: ``(B C - B0 C0) A``), or when ``B0 C0 = 0`` (LoRA: ``B A``).
    With residual factors (QPiSSA) the residual subtracts ``Br Ar`` instead of ``B0 A0``:
    ``s [B | -Br] [A ; Ar]``; a 4-bit LoRA (QLoRA) has ``Br Ar`` = 0 and stays rank r.
    Returns ``(lora_A (2r or r, in), lora_B (out, 2r or r))`` in float32; PEFT's scaling stays s.
    """
    core = None if layer.lora_core is None else layer.lora_core.detach().float()
    A, BC = layer.lora_A.detach().float(), fold_core(layer.lora_B.detach().float(), core)
    A0, B0, core0 = layer.residual_factors()
    A0, B0, core0 = A0.float(), B0.float(), None if core0 is None else core0.float()
    BC0 = fold_core(B0, core0)
    if export_rank == "2r":
        return torch.cat([A, A0], 0), torch.cat([BC, -BC0], 1)
    if "A" not in layer.train_parts:
        return A, BC - BC0
    if BC0.any():
        raise PissaError("a rank-r export needs B0 = 0 or a frozen A; this layer has neither (a method record is wrong)")
    return A, BC


VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""``max_lora_rank`` values vLLM accepts: a server of an export of rank r needs the first one >= r."""
EXPORT_NOTE = "pissa_export.json"
"""Written beside a PEFT export: its rank, the server rank it needs, and any truncation error."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_peft` wrote: the LoRA rank (the largest layer's), the smallest vLLM ``max_lora_rank`` that
    serves it, and (with
    ``max_rank``) the relative Frobenius error of the truncation over all layers and the worst layer's."""

    path: Path
    rank: int
    full_rank: int
    max_lora_rank: int | None
    relative_error: float
    worst_layer_error: float
    modules_to_save: list[str]


def export_peft(model: nn.Module, path: str | os.PathLike, max_rank: int | None = None) -> ExportReport:
    """Write a Hugging Face PEFT LoRA adapter that reproduces the trained model on the original base.

    Rank 2r (or r, see :func:`peft_factors`). ``max_rank=K`` below that writes each layer's best
    rank-K approximation of its update instead (:func:`pissa.factors.truncate`) and reports the
    error it introduced: ``sqrt(sum of the discarded S_i^2) / ||update||_F``, over all layers and
    for the worst one. Trained parameters outside the adapters (a classification head) go in as
    PEFT ``modules_to_save``, so the PEFT model has the trained head too. Layers of different ranks
    (``AdapterConfig.rank_pattern``, EVA) go in as PEFT ``rank_pattern`` with an ``alpha_pattern``
    that keeps each layer's scaling.
    """
    layers = _layers_or_fail(model)
    cfg: AdapterConfig = model.pissa_config  # type: ignore[assignment]
    if cfg.quantize is not None:
        warnings.warn(
            "the exported LoRA applies to the unquantized base weights; outputs differ from the "
            "4-bit-residual model by the residual's quantization error",
            stacklevel=2,
        )
    export_rank = METHODS[cfg.method].export_rank
    factors = {name: peft_factors(layer, export_rank) for name, layer in layers}
    scalings = {name: layer.scaling for name, layer in layers}
    if max_rank is not None and not max_rank >= 1:
        raise PissaError(f"--max-rank must be >= 1, got {max_rank}")
    full = max(A.shape[0] for A, _ in factors.values())
    kept = discarded = 0.0
    worst = 0.0
    for name, (A, B) in list(factors.items()):
        if max_rank is not None and max_rank < A.shape[0]:
            A_k, B_k, S = truncate(A, B, max_rank)
            factors[name] = (A_k, B_k)
            lost, total = float((S[max_rank:] ** 2).sum()), float((S**2).sum())
            kept, discarded = kept + total, discarded + lost
            worst = max(worst, (lost / total) ** 0.5 if total > 0 else 0.0)
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    # PEFT's LoRA scales each layer by lora_alpha / r: the most common rank is "r"; layers of another rank
    # (rank_pattern, EVA) get their own rank and alpha so that every layer keeps its pissa scaling
    r = max(set(ranks.values()), key=lambda k: (list(ranks.values()).count(k), k))
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    alphas = {name: scalings[name] * k for name, k in ranks.items()}
    alpha = scalings[next(n for n, k in ranks.items() if k == r)] * r
    alpha_pattern = {name: a for name, a in alphas.items() if a != alpha}
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    head = head_parameters(model)
    head_modules = sorted({n.rsplit(".", 1)[0] for n in head})
    for module in head_modules:  # PEFT's ModulesToSaveWrapper replaces the whole module: every parameter of it
        for pname, p in model.get_submodule(module).named_parameters():
            tensors[f"base_model.model.{module}.{pname}"] = p.detach().float().contiguous().cpu()
    names = [name for name, _ in layers]
    arch = type(model).__name__
    task = ("CAUSAL_LM" if arch.endswith(("ForCausalLM", "LMHeadModel"))
            else "SEQ_CLS" if arch.endswith("ForSequenceClassification") else None)
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): k for n, k in rank_pattern.items()},  # PEFT matches (.*\.)?(key)$
        "alpha_pattern": {re.escape(n): a for n, a in alpha_pattern.items()},
        "lora_dropout": cfg.dropout,
        "target_modules": "^(" + "|".join(re.escape(n) for n in names) + ")$",
        # a 4-bit residual (nf4.NF4Linear) remembers whether its base was a Conv1D
        "fan_in_fan_out": all(is_conv1d(layer.residual) or getattr(layer.residual, "conv1d", False) for _, layer in layers),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": head_modules or None,
    }
    report = ExportReport(
        path=Path(path), rank=max(ranks.values()), full_rank=full,
        max_lora_rank=next((v for v in VLLM_RANKS if v >= max(ranks.values())), None),
        relative_error=(discarded / kept) ** 0.5 if kept > 0 else 0.0, worst_layer_error=worst, modules_to_save=head_modules,
    )
    note = {k: v for k, v in dataclasses.asdict(report).items() if k != "path"}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / EXPORT_NOTE).write_text(json.dumps(note, indent=2))
    return report
