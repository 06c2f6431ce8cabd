"""The adapter-shape protocol (pissa.adapter.shapes): the identities every shape keeps, checked on the layers
every adapter method makes, and the rule that no code outside the protocol names a shape or its tensors."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pissa
from helpers import TOKENS, WEIGHT_ONLY, lm_loss, tiny_llama, train_steps
from pissa.adapter.base_layers import dense_weight
from pissa.adapter.shapes import LEGACY_TRAIN, SHAPES

SRC = Path(pissa.__file__).parent


def trained_layers(method: str):
    """A tiny float64 Llama adapted by ``method`` (float64 factors) and trained 3 steps; with its base."""
    base = tiny_llama(torch.float64)
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=method, rank=4, alpha=8.0, factor_dtype="float64"))
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    return base, model


@pytest.mark.parametrize("method", WEIGHT_ONLY)
def test_every_shape_keeps_its_identities(method) -> None:
    """W_res = W - initial; delta starts at initial; forward = x delta^T; merged = W_res + delta; update = delta - initial;
    a PEFT form (where there is one) reproduces the update; the variables' frozen copies hold their start."""
    base, model = trained_layers(method)
    for name, layer in pissa.adapted_layers(model):
        x = torch.randn(3, layer.in_features, dtype=torch.float64)
        W = dense_weight(base.get_submodule(name)).detach()
        t, s, shape = layer.tensors(), layer.scaling, layer.shape
        initial = layer.initial()
        expected_residual = W if initial is None else W - initial
        torch.testing.assert_close(dense_weight(layer.residual), expected_residual, rtol=0, atol=1e-12)
        torch.testing.assert_close(shape.forward(x, t, s), F.linear(x, layer.delta()), rtol=1e-10, atol=1e-12)
        residual = dense_weight(layer.residual)
        torch.testing.assert_close(shape.merged(residual, t, s), residual + layer.delta().detach())
        update = shape.update(t, s)
        torch.testing.assert_close(update, layer.delta().detach() - (0 if initial is None else initial))
        if (pair := shape.peft(t, s, layer.train_parts, pissa.METHODS[method].export_rank)) is not None:
            torch.testing.assert_close(s * (pair[1].double() @ pair[0].double()), update, rtol=1e-5, atol=1e-6)
        start = {copy_: t[var] for var, copy_ in shape.variables.items() if var in t}
        assert start and all(not t[c].requires_grad for c in start)
        assert {n for n in layer.train_parts} <= set(shape.variables)


def test_an_adapter_of_an_unknown_shape_is_refused_in_one_line(tmp_path) -> None:
    import json

    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=2))
    pissa.save_adapter(model, tmp_path / "a")
    config = tmp_path / "a" / "adapter_config.json"
    doc = json.loads(config.read_text())
    for meta in doc["layers"].values():
        meta["shape"] = "hexagonal"
    doc.pop("integrity")
    config.write_text(json.dumps(doc))
    with pytest.raises(pissa.PissaError, match="unknown adapter shape 'hexagonal'.*upgrade pissa"):
        pissa.load_adapter(tiny_llama(), tmp_path / "a")


def _code_strings(path: Path) -> set[str]:
    """The string constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


def test_no_code_outside_the_protocol_names_a_shape_or_its_tensors() -> None:
    """Shape names and their tensor names appear as code only in adapter/shapes/ and in methods/ (whose
    inits produce the tensors); every other path goes through the protocol."""
    names = set(SHAPES) | set(LEGACY_TRAIN.values())
    for shape in SHAPES.values():
        names |= set(shape.variables) | set(shape.variables.values()) | set(shape.required)
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("adapter/shapes/", "methods/")):
            continue
        # f-strings like f"base_model.model.{name}.lora_A.weight" name PEFT's keys, not ours: only whole constants count
        if found := _code_strings(path) & names:
            offenders[rel] = sorted(found)
    assert not offenders, offenders
