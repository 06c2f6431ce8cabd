"""Several named adapters on one base, and the model at its initial factors (:func:`reference`).

One base holds any number of adapters; one is active. The base weight is held once, as the first adapter's
residual ``W_res_h = W - initial_h`` (:class:`~pissa.adapter.layer.PissaLinear`): an adapter X added next to it
keeps only its own tensors (factors and their frozen initial copies, what its folder holds) and, while active,
computes ``(W - initial_X) x`` as ``W_res_h x + initial_h x - initial_X x`` with the initial terms as low-rank
products (``s (x A0^T) B0^T``). Memory: no dense weight per adapter, only each adapter's factors; compute: two
extra rank-r products per adapted layer while an adapter other than the held one is active (none for the held
one: it computes exactly as a model that holds it alone). Quantized residuals are refused: ``nf4(W - initial_h)``
is not ``nf4(W - initial_X)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from pissa.adapter.attach import adapted_layers
from pissa.adapter.config import AdapterConfig
from pissa.adapter.layer import AdapterSlot, PissaLinear
from pissa.adapter.shapes import layer_facts
from pissa.errors import PissaError
from pissa.files.adapter_dir import TENSORS_FILE, AdapterFiles

DEFAULT = "default"
"""The name of a model's first adapter when none is given (as PEFT's)."""


def _layers(model: nn.Module) -> list[tuple[str, PissaLinear]]:
    layers = list(adapted_layers(model))
    if not layers:
        raise PissaError("this model has no pissa adapters; call pissa.attach or pissa.load_adapter first")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, the active one first."""
    return _layers(model)[0][1].names()


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter the model computes with."""
    return _layers(model)[0][1].adapter_name


def check_name(name: str) -> str:
    """``name`` if it can name an adapter (a non-empty string without ``.``, not starting with ``_``)."""
    if not isinstance(name, str) or not name or "." in name or name.startswith("_"):
        raise PissaError(f"`name` must be a non-empty name without '.' that does not start with '_', got {name!r}")
    return name


def name_adapter(model: nn.Module, name: str) -> None:
    """Name a model's only adapter ``name`` (load_adapter's ``name=`` on a base model)."""
    for _, layer in _layers(model):
        layer.adapter_name = layer.held = check_name(name)


def _configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Every adapter's config by name (created on the first added adapter; ``pissa_config`` is the active one's)."""
    if not hasattr(model, "pissa_configs"):
        model.pissa_configs = {active_adapter(model): model.pissa_config}  # type: ignore[assignment]
    return model.pissa_configs  # type: ignore[return-value]


def _refuse_quantized(cfg: AdapterConfig, what: str) -> None:
    if cfg.quantize is not None:
        raise PissaError(f"{what} has a quantized residual (quantize={cfg.quantize}); several adapters on one base need "
                         "a dense one (each adapter's frozen part is derived from the one base weight)")


def add_adapter(model: nn.Module, adapter: AdapterFiles, name: str) -> nn.Module:
    """Add the adapter in ``adapter`` to ``model`` (which holds one or more already) as ``name``; the active adapter
    stays active. Everything is checked before the model changes."""
    check_name(name)
    layers = dict(_layers(model))
    if name in list_adapters(model):
        raise PissaError(f"`name` {name!r} is already an adapter of this model; pick another or unload it first")
    path, doc = adapter.path, adapter.doc
    cfg = AdapterConfig.from_dict(doc["config"])
    _refuse_quantized(model.pissa_config, "this model's adapter")  # type: ignore[arg-type]
    _refuse_quantized(cfg, f"adapter at {path}")
    if adapter.head_names:
        raise PissaError(f"adapter at {path} trains a head ({adapter.head_names[0]}); adapters that share one base "
                         "cannot each have their own head: load it alone")
    if set(doc["layers"]) != set(layers):
        odd = sorted(set(doc["layers"]) ^ set(layers))[0]
        raise PissaError(f"adapter at {path} adapts other layers than this model's adapters ({odd!r} differs); "
                         "adapters on one base must adapt the same layers")
    slots: dict[str, AdapterSlot] = {}
    for n, meta in doc["layers"].items():
        layer = layers[n]
        if isinstance(layer.residual, nn.Conv2d):
            raise PissaError(f"layer {n!r} is a Conv2d; several adapters on one base adapt linear layers only")
        if (meta["out"], meta["in"]) != (layer.out_features, layer.in_features) or meta["base_digest"] != layer.base_digest:
            raise PissaError(f"adapter at {path} was made from a different base model (weights of {n!r} differ)")
        tensors = {k: t.to(layer.weight.device) for k, t in adapter.layer(n).items()}
        shape, train, rank, facts = layer_facts(meta, tensors, f"{path / TENSORS_FILE} ({n})")
        dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        slots[n] = AdapterSlot(shape, tensors, train, cfg.scaling_for(rank), rank, dropout, facts,
                               meta["residual_digest"])
    for n, slot in slots.items():
        if layers[n].slots is None:
            layers[n].slots = nn.ModuleDict()
        layers[n].slots[name] = slot  # type: ignore[index]
    _configs(model)[name] = cfg
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active one (its trainable tensors the only trainable ones); the base is not touched."""
    names = list_adapters(model)
    if name not in names:
        raise PissaError(f"`name` {name!r} is not an adapter of this model (it has: {', '.join(names)})")
    for _, layer in _layers(model):
        if layer.adapter_name != name:
            current = layer.adapter_name
            slot = layer.slots.pop(name)  # type: ignore[union-attr]
            assert isinstance(slot, AdapterSlot)
            layer.slots[current] = layer.stash()  # type: ignore[index]
            layer.install(name, slot)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in _layers(model):
        for p in layer.trainable():
            p.requires_grad_(True)
    model.pissa_config = _configs(model)[name]  # type: ignore[assignment]
    return model


def unload_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the inactive adapter ``name`` from the model. When it is the one whose initial term the residual holds,
    its frozen initial tensors stay (under ``_held``): the other adapters derive their frozen part from them."""
    names = list_adapters(model)
    if name not in names:
        raise PissaError(f"`name` {name!r} is not an adapter of this model (it has: {', '.join(names)})")
    if name == active_adapter(model):
        raise PissaError(f"`name` {name!r} is the active adapter; pissa.set_adapter(model, another) first "
                         "(a model's only adapter goes with pissa.merge or by loading the base again)")
    for _, layer in _layers(model):
        assert layer.slots is not None
        slot = layer.slots.pop(name)
        if layer.held == name:
            assert isinstance(slot, AdapterSlot)
            frozen = {k: t for k, t in slot.tensors().items() if k not in slot.shape.variables}
            layer.slots["_held"] = AdapterSlot(slot.shape, frozen, (), slot.scaling, slot.rank, nn.Identity(),
                                               slot.facts, slot.residual_digest)
            layer.held = "_held"
    del _configs(model)[name]
    return model


@contextmanager
def reference(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes with its initial factors: every variable replaced by its frozen initial
    copy, without adapter dropout, no tensor copied. For a method that starts at the base (PiSSA, LoRA and every
    exact-start method without ``quantize``) that is the base model, ``W_res + s B0 A0 = W`` (LoRA: ``B0 = 0``):
    DPO's reference model without a second copy of the model. Gradients do not reach the variables."""
    layers = _layers(model)
    before = [layer.use_initial for _, layer in layers]
    for _, layer in layers:
        layer.use_initial = True
    try:
        yield model
    finally:
        for (_, layer), was in zip(layers, before):
            layer.use_initial = was


@contextmanager
def activated(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Within the block adapter ``name`` is active (None: the active one), then the previous one again
    (:func:`pissa.save_adapter` with ``name=``)."""
    previous = active_adapter(model)
    if name is None or name == previous:
        yield model
        return
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)
