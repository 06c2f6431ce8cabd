"""Data-aware methods (CorDA, EVA, EoRA, LoRA-GA, LoRA-SB), LoLDU, per-layer ranks and QPiSSA's weighted last step.

The formulas on synthetic weights and statistics whose answer is known; then every data-aware
method through attach / save / load / merge / PEFT export on a tiny model with real statistics.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import pissa
from helpers import TOKENS, attach_train_reload, decaying, lm_loss, logits, relative_error, tiny_llama, token_batches, train_steps
from pissa.analysis.quant_error import layer_ratios
from pissa.files.statistics import open_calibration
from pissa.methods.data_aware import eora_fit, eva_ranks, explained_variance, lora_ga_init
from pissa.methods.inits import loldu_init
from pissa.methods.inputs import InitOptions, Stats
from pissa.methods.qpissa import refine
from pissa.methods.registry import ADAPTERS, METHODS, init_structured
from pissa.training.compare import reads_statistics

DATA_AWARE = sorted(m for m in ADAPTERS if reads_statistics(m))


def _init(W: torch.Tensor, r: int, method: str, stats: Stats | None = None, **kw):
    opt = InitOptions(seeds=[0], svd="exact", stats=None if stats is None else stats.batched(), **kw)
    return init_structured(W[None], r, method, opt).layer(0)


def _product(f) -> torch.Tensor:
    A, B = f.folded()
    return B @ A


def _spd(n: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """A symmetric positive definite n x n matrix with eigenvalues decay^i and random eigenvectors."""
    return (lambda M: M @ M.T)(decaying(n, n, decay**0.5, seed))


def _cosines(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of X (k, n) and Y (k, n)."""
    qx, qy = torch.linalg.qr(X.double().T).Q, torch.linalg.qr(Y.double().T).Q
    return torch.linalg.svdvals(qx.T @ qy)


def test_corda_with_identity_statistics_is_pissa_and_kpm_is_milora() -> None:
    W = decaying(40, 24, 0.9, 1).float()
    eye = Stats(cov=torch.eye(24), mean=torch.zeros(24))
    for corda, plain in (("corda", "pissa"), ("corda-kpm", "milora")):
        got, want = _init(W, 5, corda, eye), _init(W, 5, plain)  # default damping: C = 1.01 I, the same product
        torch.testing.assert_close(_product(got), _product(want), rtol=1e-4, atol=1e-5)
        got = _init(W, 5, corda, eye, damping=0.0)  # undamped: the same factors (up to the SVD's signs)
        torch.testing.assert_close(got.B.abs(), want.B.abs(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.A.abs(), want.A.abs(), rtol=1e-4, atol=1e-5)


def test_corda_orients_by_the_covariance_and_rebuilds_w_at_full_rank() -> None:
    W, C = decaying(30, 20, 0.9, 2).float(), _spd(20, 3).float()
    f = _init(W, 20, "corda", Stats(cov=C), damping=0.0)
    torch.testing.assert_close(_product(f), W, rtol=1e-3, atol=1e-4)
    top = _init(W, 4, "corda", Stats(cov=C), damping=0.0)
    U, S, Vh = torch.linalg.svd(W.double() @ C.double())
    assert _cosines(top.B.T, U[:, :4].T).min() > 0.999  # B spans the top left singular vectors of W C


def test_eva_a_spans_the_top_principal_directions_and_b_is_zero() -> None:
    n = 24
    Q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(4))).Q
    variances = 2.0 ** -torch.arange(n, dtype=torch.float32)
    mean = torch.randn(n)
    cov = (Q * variances) @ Q.T + torch.outer(mean, mean)  # second moment = centred covariance + mean mean^T
    f = _init(torch.randn(16, n), 6, "eva", Stats(cov=cov, mean=mean))
    assert torch.count_nonzero(f.B) == 0
    assert _cosines(f.A, Q[:, :6].T).min() > 0.9999
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(explained_variance(cov, mean)[:3].float(), variances[:3] / variances.sum(), rtol=1e-4, atol=1e-6)


def test_eva_rank_budget_and_uniform_at_rho_one() -> None:
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.9, 0.05, 0.03, 0.01]),
              "c": torch.tensor([0.4, 0.35, 0.2, 0.04])}
    ranks = dict.fromkeys(ratios, 2)
    assert eva_ranks(ratios, ranks, 1.0) == ranks
    spread = eva_ranks(ratios, ranks, 2.0)
    assert sum(spread.values()) == 6 and spread == {"a": 2, "b": 1, "c": 3}
    assert eva_ranks(ratios, ranks, 1.5) == {"a": 2, "b": 1, "c": 3}  # round(1.5 * 2) = 3 offered each


def _weighted_error(M: torch.Tensor, C: torch.Tensor) -> float:
    """sqrt(tr(M C M^T)) = ||M L||_F for L L^T = C: the activation-weighted error (float64)."""
    M, C = M.double(), C.double()
    return float(torch.einsum("oi,ij,oj->", M, C, M).clamp_min(0).sqrt())


def test_eora_error_is_the_discarded_singular_values_of_e_l() -> None:
    E, C = torch.randn(32, 20, dtype=torch.float64), _spd(20, 5).double()
    A, B = eora_fit(E[None], 6, InitOptions(svd="exact", stats=Stats(cov=C[None]), damping=0.0))
    lam, Q = torch.linalg.eigh(C)
    S = torch.linalg.svdvals(E @ (Q * lam.sqrt()))
    assert _weighted_error(E - B[0] @ A[0], C) == pytest.approx(float(S[6:].square().sum().sqrt()), rel=1e-9)
    plain = torch.linalg.svd(E)
    best_plain = (plain.U[:, :6] * plain.S[:6]) @ plain.Vh[:6]
    assert _weighted_error(E - B[0] @ A[0], C) < _weighted_error(E - best_plain, C)


@pytest.mark.parametrize("seed", [0, 1])
def test_qpissa_weighted_last_step_never_exceeds_the_plain_one(seed) -> None:
    pytest.importorskip("bitsandbytes")
    W = decaying(64, 48, 0.97, seed).float()[None]
    C = _spd(48, seed + 10, 0.9).float()[None]
    plain_opt = InitOptions(seeds=[seed], svd="exact", damping=0.0)
    weighted_opt = InitOptions(seeds=[seed], svd="exact", stats=Stats(cov=C), damping=0.0)
    start = init_structured(W, 8, "pissa", plain_opt)
    plain, weighted = refine(W, start, "pissa", 3, plain_opt), refine(W, start, "pissa", 3, weighted_opt)
    torch.testing.assert_close(weighted.Ar, plain.Ar)  # the same quantized residual Q_T; only the last step differs
    from pissa.methods.nf4 import nf4

    Q = nf4(W - plain.Br @ plain.Ar)
    assert _weighted_error((W - Q - weighted.B @ weighted.A)[0], C[0]) <= _weighted_error((W - Q - plain.B @ plain.A)[0], C[0])
    eora = refine(W, start, "eora", 3, weighted_opt)
    assert torch.count_nonzero(eora.Ar) == 0  # EoRA: the residual is nf4(W) itself


def test_lora_ga_from_a_known_gradient() -> None:
    g = torch.Generator().manual_seed(6)
    U = torch.linalg.qr(torch.randn(40, 12, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(24, 12, generator=g, dtype=torch.float64)).Q
    G = (U * torch.arange(12, 0, -1, dtype=torch.float64)) @ V.T
    W = torch.randn(40, 24, dtype=torch.float64)
    A, B = lora_ga_init(W[None], 3, InitOptions(svd="exact", stats=Stats(grad=G[None])))
    zeta = 40**0.25 / 4.0
    torch.testing.assert_close(A[0].abs(), zeta * V[:, :3].T.abs())
    torch.testing.assert_close(B[0].abs(), zeta * U[:, 3:6].abs())
    with pytest.raises(pissa.PissaError, match="2r = 26"):
        lora_ga_init(W[None], 13, InitOptions(stats=Stats(grad=G[None])))


def test_lora_sb_approximates_the_first_full_update_and_starts_there() -> None:
    G = torch.randn(30, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    f = _init(G.new_zeros(30, 20), 4, "lora-sb", Stats(grad=G), first_lr=1e-3)
    delta = -1e-3 * torch.sign(G)
    U, S, Vh = torch.linalg.svd(delta)
    torch.testing.assert_close(_product(f), (U[:, :4] * S[:4]) @ Vh[:4])
    assert f.train == ("core",) and f.core.shape == (4, 4) and torch.count_nonzero(f.Ar) == 0
    assert not METHODS["lora-sb"].exact_start and all(METHODS[m].exact_start for m in METHODS if m != "lora-sb")


def test_loldu_rebuilds_w_at_full_rank_and_trains_the_diagonal() -> None:
    for shape in ((20, 12), (12, 20), (16, 16)):
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        f = loldu_init(W[None], min(shape), InitOptions())
        torch.testing.assert_close((f.B * f.core.unsqueeze(-2)) @ f.A, W[None])
    assert f.train == ("core",) and f.core.shape == (1, 16)


def test_data_aware_method_without_statistics_is_one_line_error() -> None:
    for method, flag in (("corda", "--out stats.safetensors`"), ("lora-ga", "--gradients`")):
        with pytest.raises(pissa.PissaError, match="pissa calibrate") as e:
            pissa.attach(tiny_llama(), pissa.AdapterConfig(method=method, rank=2))
        assert "\n" not in str(e.value) and flag in str(e.value)
        with pytest.raises(pissa.PissaError, match="calibrate"):
            pissa.decompose(torch.randn(8, 6), 2, method=method)


# --- whole models --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "stats.safetensors"
    pissa.calibrate(tiny_llama(), token_batches(n=3), gradients=True, out=path)
    return str(path)


@pytest.mark.parametrize("method", DATA_AWARE)
def test_attach_save_load_export_with_statistics(tmp_path, stats_file, method) -> None:
    from peft import PeftModel

    base = tiny_llama()
    cfg = pissa.AdapterConfig(method=method, rank=4, alpha=8.0, calibration=stats_file)
    model, loaded = attach_train_reload(base, cfg, tmp_path / "a")
    pissa.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert relative_error(logits(peft_model), logits(model)) <= 1e-5
    assert relative_error(logits(pissa.merge(loaded)), logits(model)) <= 1e-5


def test_statistics_of_another_model_are_refused(stats_file) -> None:
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight.mul_(2)
    with pytest.raises(pissa.PissaError, match="another model"):
        pissa.attach(other, pissa.AdapterConfig(method="eva", rank=2, calibration=stats_file))
    assert not list(pissa.adapted_layers(other))


def test_rank_pattern_is_saved_loaded_merged_and_exported(tmp_path) -> None:
    from peft import PeftModel

    base = tiny_llama()
    cfg = pissa.AdapterConfig(rank=4, alpha=8.0, rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6, "v_proj": 0})
    model = pissa.attach(copy.deepcopy(base), cfg)
    ranks = {n: layer.rank for n, layer in pissa.adapted_layers(model)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 6
    assert ranks["model.layers.0.mlp.up_proj"] == 4 and not any(n.endswith("v_proj") for n in ranks)
    assert relative_error(logits(model), logits(base)) <= 1e-5
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert {n: layer.rank for n, layer in pissa.adapted_layers(loaded)} == ranks
    pissa.export_peft(model, tmp_path / "peft")
    doc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert doc["r"] == 8 and sorted(doc["rank_pattern"].values()) == [4, 4, 12]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert relative_error(logits(peft_model), logits(model)) <= 1e-5
    merged = pissa.merge_state_dict(base.state_dict(), tmp_path / "a")
    reference = pissa.merge(loaded).state_dict()
    torch.testing.assert_close(merged["model.layers.1.mlp.down_proj.weight"], reference["model.layers.1.mlp.down_proj.weight"])


def test_eva_redistributes_ranks_into_a_saved_pattern(tmp_path, stats_file) -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="eva", rank=4, calibration=stats_file))
    ranks = {n: layer.rank for n, layer in pissa.adapted_layers(model)}
    assert sum(ranks.values()) <= 14 * 4 and max(ranks.values()) <= 8 and len(set(ranks.values())) > 1
    saved = model.pissa_config
    assert saved.eva_rho == 1.0 and all(saved.layer_rank(n) == r for n, r in ranks.items())
    uniform = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="eva", rank=4, eva_rho=1.0, calibration=stats_file))
    assert {layer.rank for _, layer in pissa.adapted_layers(uniform)} == {4}


def test_quant_error_with_calibration_adds_the_weighted_table(tmp_path, stats_file, monkeypatch, capsys) -> None:
    pytest.importorskip("bitsandbytes")
    from pissa import cli
    from pissa.adapter.targets import find_targets

    model = tiny_llama()
    names = [n for n in find_targets(model, "all-linear") if n.endswith(("q_proj", "down_proj"))]
    weights = {n: model.get_submodule(n).weight.detach() for n in names}
    covs = {n: open_calibration(stats_file).layer_stats(n, ["covariance"]).cov for n in names}
    rows = layer_ratios(weights, 4, [1, 2], covariances=covs)
    for row in rows:  # the weighted last step never loses to the plain one on the weighted metric (damping aside)
        assert row.weighted["QPiSSA+EoRA-2"] >= row.weighted["QPiSSA-2"] - 0.5
        assert row.weighted["EoRA"] > 0 and row.weighted["QLoRA"] == 0
    assert sum(r.weighted["QPiSSA+EoRA-2"] - r.weighted["QPiSSA-2"] for r in rows) > 0
    monkeypatch.setattr("pissa.analysis.quant_error.model_weights", lambda *a: weights)
    out = tmp_path / "qe"
    assert cli.main(["analyze", "quant-error", "--model", "tiny", "--rank", "4", "--iters", "1,2", "--calibration", stats_file,
                     "--out", str(out)]) == 0
    text = (out / "quant_error.md").read_text()
    assert "Activation-weighted" in text and "| QPiSSA+EoRA-2 |" in text and "EoRA" in capsys.readouterr().out
    assert "weighted QPiSSA+EoRA-1" in (out / "quant_error.csv").read_text()


def test_pissa_init_streams_with_statistics_and_eva_ranks(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from pissa.cli import main

    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--samples", "16",
                 "--threads", "1", "--out", str(stats)]) == 0
    for method in ("corda", "eva"):
        out = tmp_path / method
        assert main(["init", "--model", str(tiny / "llama"), "--out", str(out), "--method", method, "--rank", "3",
                     "--calibration", str(stats), "--no-progress"]) == 0
        base = AutoModelForCausalLM.from_pretrained(tiny / "llama")
        before = logits(base)
        adapted = pissa.load_adapter(base, out / "adapter")
        assert relative_error(logits(adapted), before) <= 1e-5
        doc = json.loads((out / "adapter" / "adapter_config.json").read_text())
        ranks = {n: layer.rank for n, layer in pissa.adapted_layers(adapted)}
        if method == "eva":
            assert doc["config"]["eva_rho"] == 1.0 and sum(ranks.values()) <= 3 * 14 and len(set(ranks.values())) > 1
    assert main(["init", "--model", str(tiny / "llama"), "--out", str(tmp_path / "x"), "--method", "lora-ga",
                 "--calibration", str(stats)]) == 2 and not (tmp_path / "x").exists()
