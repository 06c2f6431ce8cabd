"""save_adapter / load_adapter / export_peft reproduce the trained model; wrong bases are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import pissa
from helpers import TOKENS, WEIGHT_ONLY, lm_loss, logits, mlp, relative_error, tiny_gpt2, tiny_llama, train_steps
from pissa.methods.registry import METHODS

MAKERS = {"gpt2-conv1d": tiny_gpt2, "llama-linear": tiny_llama}
NO_LORA_FORM = {"sara", "soka"}
"""Methods whose adapter has no PEFT LoRA form (their refusals: tests/unit/methods/test_sara.py, test_soka.py)."""


def assert_same_adapters(loaded, model) -> None:
    """Bit-identical residuals and factors, and the same outputs (up to kernel non-determinism)."""
    pairs = list(zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)))
    assert len(pairs) == len(list(pissa.adapted_layers(model))) > 0
    for (n1, a), (n2, b) in pairs:
        assert n1 == n2
        assert torch.equal(a.residual.weight, b.residual.weight)
        ta, tb = a.tensors(), b.tensors()
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert relative_error(logits(loaded), logits(model)) <= 1e-6


def trained(make, method: str = "pissa", alpha: float | None = 8.0):
    """(untouched base copy, trained adapted model)."""
    base = make()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=method, rank=4, alpha=alpha))
    train_steps(model, [TOKENS], lm_loss, steps=4, lr=1e-2)
    return base, model


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("method", WEIGHT_ONLY)
def test_save_load_round_trip_is_exact(tmp_path, arch, method) -> None:
    base, model = trained(MAKERS[arch], method)
    pissa.save_adapter(model, tmp_path / "adapter")
    loaded = pissa.load_adapter(base, tmp_path / "adapter")
    assert_same_adapters(loaded, model)
    assert pissa.trainable_parameters(loaded) == pissa.trainable_parameters(model)
    # and it keeps training from there
    train_steps(loaded, [TOKENS], lm_loss, steps=1)


def test_adapter_dir_has_no_pickle_and_records_fingerprint(tmp_path) -> None:
    _, model = trained(tiny_llama)
    path = pissa.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter.safetensors", "adapter_config.json"]
    doc = json.loads((path / "adapter_config.json").read_text())
    assert doc["config"]["rank"] == 4 and len(doc["base_fingerprint"]) == 32
    assert len(doc["layers"]) == 14


def test_different_base_is_refused(tmp_path) -> None:
    _, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[3, 3] += 1e-3
    with pytest.raises(pissa.PissaError, match="made from a different base model .*mlp.up_proj"):
        pissa.load_adapter(other, tmp_path / "a")
    with pytest.raises(pissa.PissaError, match="made for another model"):
        pissa.load_adapter(tiny_gpt2(), tmp_path / "a")


def test_residual_model_is_accepted_as_base(tmp_path) -> None:
    """A model whose target weights already are the residuals (what `pissa init` writes) loads the same."""
    base, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    residual_model = copy.deepcopy(base)
    for name, layer in pissa.adapted_layers(model):
        residual_model.get_submodule(name).weight.data.copy_(layer.residual.weight)
    loaded = pissa.load_adapter(residual_model, tmp_path / "a")
    assert_same_adapters(loaded, model)


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path) -> None:
    _, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    pissa.save_adapter(model, tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_failed_save_leaves_previous_adapter(tmp_path, monkeypatch) -> None:
    _, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("pissa.files.adapter_dir.save_file", boom)
    with pytest.raises(OSError):
        pissa.save_adapter(model, tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == before


@pytest.mark.parametrize("content, message", [(None, "not a pissa adapter directory"), ("{oops", "not valid JSON")])
def test_bad_adapter_dir_is_refused(tmp_path, content, message) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    if content is not None:
        (d / "adapter_config.json").write_text(content)
        (d / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(pissa.PissaError, match=message):
        pissa.load_adapter(tiny_llama(), d)


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("method", [m for m in WEIGHT_ONLY if m not in NO_LORA_FORM])
def test_export_peft_loads_in_peft_and_reproduces_outputs(tmp_path, arch, method) -> None:
    from peft import PeftModel

    base, model = trained(MAKERS[arch], method)
    pissa.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if METHODS[method].full_rank:  # each layer's min(out, in); "r" is the most common one
        assert cfg["r"] in {min(layer.in_features, layer.out_features) for _, layer in pissa.adapted_layers(model)}
    else:
        assert cfg["r"] == (4 if method in ("lora", "lora-xs", "svfit", "loldu") else 8)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert relative_error(logits(peft_model), logits(model)) <= 1e-5


def test_export_of_unadapted_model_is_refused(tmp_path) -> None:
    with pytest.raises(pissa.PissaError, match="no pissa adapters"):
        pissa.export_peft(mlp(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_truncate_keeps_the_best_rank_k_and_reports_the_discarded_values() -> None:
    from pissa.methods.factors import truncate

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 40, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    A_k, B_k, S = truncate(A, B, 3)
    exact = torch.linalg.svdvals(B @ A)[:8]
    assert torch.allclose(S, exact, rtol=1e-10) and A_k.shape == (3, 40) and B_k.shape == (30, 3)
    error = torch.linalg.matrix_norm(B @ A - B_k @ A_k)
    assert error.item() == pytest.approx((S[3:] ** 2).sum().sqrt().item(), rel=1e-9)


def test_export_max_rank_truncates_reports_its_error_and_loads_in_peft(tmp_path) -> None:
    from peft import PeftModel

    from pissa.adapter.export import EXPORT_NOTE

    base = tiny_llama()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=4))
    train_steps(model, [TOKENS], lm_loss, steps=3)
    report = pissa.export_peft(model, tmp_path / "k3", max_rank=3)
    assert (report.rank, report.full_rank, report.max_lora_rank) == (3, 8, 8)
    updates = {n: (layer.merged().weight - base.get_submodule(n).weight).detach().double()
               for n, layer in pissa.adapted_layers(model)}
    S = {n: torch.linalg.svdvals(u) for n, u in updates.items()}
    expected = (sum((s[3:] ** 2).sum() for s in S.values()) / sum((s**2).sum() for s in S.values())).sqrt().item()
    assert report.relative_error == pytest.approx(expected, rel=1e-4) and 0 < report.relative_error < 1
    worst = max(((s[3:] ** 2).sum() / (s**2).sum()).sqrt().item() for s in S.values())
    assert report.worst_layer_error == pytest.approx(worst, rel=1e-4)
    note = json.loads((tmp_path / "k3" / EXPORT_NOTE).read_text())
    assert note["rank"] == 3 and note["relative_error"] == pytest.approx(report.relative_error)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "k3")
    for n, u in updates.items():  # PEFT's update is the best rank-3 approximation of each layer's update
        layer = peft_model.base_model.model.get_submodule(n)
        got = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double() * layer.scaling["default"]
        U, s, Vh = torch.linalg.svd(u)
        assert torch.allclose(got, (U[:, :3] * s[:3]) @ Vh[:3], atol=1e-5)
    full = pissa.export_peft(model, tmp_path / "full", max_rank=16)  # above the full rank: nothing to truncate
    assert (full.rank, full.relative_error) == (8, 0.0)


def test_export_includes_a_trained_classifier_head_as_modules_to_save(tmp_path) -> None:
    from peft import PeftModel
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_labels=2)).eval()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=4))
    model.classifier.weight.requires_grad_(True)
    model.classifier.bias.requires_grad_(True)
    ids = torch.randint(0, 96, (4, 9), generator=torch.Generator().manual_seed(1))
    train_steps(model, [ids], lambda m, x: m(input_ids=x).logits.pow(2).mean(), steps=3, lr=5e-2)
    report = pissa.export_peft(model, tmp_path / "peft")
    assert report.modules_to_save == ["classifier"]
    fresh = copy.deepcopy(base)
    with torch.no_grad():  # another random head: the export must bring the trained one
        fresh.classifier.weight.normal_()
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)
