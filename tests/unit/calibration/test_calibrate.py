"""The calibration pass: activation statistics per distinct input, padding left out, loss gradients,
the cached file, and the same result split over two processes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import tiny_llama, token_batches, torchrun
from pissa.adapter.targets import find_targets
from pissa.calibration.batches import as_batch, by_length
from pissa.calibration.collect import add_gram, gram_matrix, gram_strips
from pissa.cli import main
from pissa.errors import PissaError
from pissa.files.statistics import open_calibration


def _inputs(model, batches) -> dict[str, list[torch.Tensor]]:
    """Every target layer's non-padding input rows, captured directly (the reference)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    current: dict[str, torch.Tensor] = {}
    for n in find_targets(model, "all-linear"):
        def hook(m, args, n=n):
            seen.setdefault(n, []).append(args[0][current["mask"].bool()].double())
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"]
            model(**b)
    for h in handles:
        h.remove()
    return seen


def test_covariance_and_mean_per_distinct_input_without_padding() -> None:
    model, batches = tiny_llama(), token_batches()
    stats = pissa.calibrate(model, batches)
    ref = _inputs(model, batches)
    layer = "model.layers.0."
    keys = {n: e["input"] for n, e in stats.layers.items()}
    assert keys[layer + "self_attn.k_proj"] == keys[layer + "self_attn.v_proj"] == layer + "self_attn.q_proj"
    assert keys[layer + "mlp.up_proj"] == layer + "mlp.gate_proj" and keys[layer + "mlp.down_proj"] == layer + "mlp.down_proj"
    assert len(set(keys.values())) == 4 * 2  # q/k/v, o, gate/up, down per block
    for name in (layer + "self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        X = torch.cat(ref[name])
        assert X.shape[0] == 4 * (10 + 7 + 4)
        s = stats.layer_stats(name, ["covariance"])
        torch.testing.assert_close(s.cov.double(), X.T @ X / len(X), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.mean.double(), X.mean(0), rtol=1e-5, atol=1e-6)
    assert stats.info["tokens"] == 84 and not stats.has_gradients


def test_gradients_equal_autograd_of_the_mean_loss() -> None:
    model, batches = tiny_llama(), token_batches(n=2)
    stats = pissa.calibrate(model, batches, gradients=True)
    ref = tiny_llama()
    ref.requires_grad_(True)
    total = 0
    for b in batches:
        batch = as_batch(b)
        logits = ref(**batch.inputs()).logits[:, :-1]
        target = batch.target_mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[target], batch.input_ids[:, 1:][target], reduction="sum")
        loss.backward()
        total += int(target.sum())
    assert stats.info["target_tokens"] == total
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        expected = ref.get_submodule(name).weight.grad / total
        torch.testing.assert_close(stats.layer_stats(name, ["gradient"]).grad, expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no weight gradient made, flags restored


def test_gram_strips_hold_the_upper_triangle_of_x_t_x() -> None:
    X = torch.randn(40, 300, dtype=torch.float64)  # 3 strips of at most 128 rows
    strips = gram_strips(300, X)
    add_gram(strips, X[:25])
    add_gram(strips, X[25:])
    assert sum(s.numel() for s in strips) < 0.7 * 300**2
    torch.testing.assert_close(gram_matrix(strips), X.T @ X)


def test_rows_regrouped_by_length_keep_their_tokens() -> None:
    batches = [as_batch(b) for b in token_batches(n=3)]
    grouped = by_length(batches)
    assert [len(b.input_ids) for b in grouped] == [3, 3, 3] and [b.input_ids.shape[1] for b in grouped] == [4, 7, 10]
    rows = lambda bs: sorted(tuple(ids[m.bool()].tolist()) for b in bs for ids, m in zip(b.input_ids, b.attention_mask))
    assert rows(grouped) == rows(batches)


def test_gradients_without_covariance(tmp_path) -> None:
    model, batches = tiny_llama(), token_batches(n=2)
    both = pissa.calibrate(model, batches, gradients=True)
    path = tmp_path / "grad.safetensors"
    only = pissa.calibrate(model, batches, gradients=True, covariance=False, out=path)
    assert not any(k.endswith(".cov") for k in load_file(path)) and not open_calibration(path).has_covariance
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(only.layer_stats(name, ["gradient"]).grad, both.layer_stats(name, ["gradient"]).grad)
    with pytest.raises(PissaError, match="gradients only"):
        only.layer_stats(name, ["covariance"])
    assert pissa.calibrate(model, batches, gradients=True, out=path).has_covariance  # recomputed with covariances


def test_file_is_reused_when_model_and_data_match(tmp_path) -> None:
    path = tmp_path / "stats.safetensors"
    model = tiny_llama()
    first = pissa.calibrate(model, token_batches(), out=path)
    stamp = path.stat().st_mtime_ns
    again = pissa.calibrate(model, token_batches(), out=path)
    assert path.stat().st_mtime_ns == stamp and not again.tensors  # read from the file, not recomputed
    name = "model.layers.1.self_attn.o_proj"
    torch.testing.assert_close(again.layer_stats(name, ["covariance"]).cov, first.layer_stats(name, ["covariance"]).cov)
    pissa.calibrate(model, token_batches(seed=1), out=path)  # other data: recomputed
    assert path.stat().st_mtime_ns != stamp and open_calibration(path).data_digest != first.data_digest
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(PissaError, match="another model"):
        open_calibration(path).check("model.layers.0.mlp.up_proj", model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.usefixtures("one_thread")
def test_calibration_split_over_two_processes_equals_one(tmp_path) -> None:
    torchrun(
        """
        import sys, torch
        import pissa
        from pissa.runtime import distributed
        from helpers import tiny_llama, token_batches, torchrun
        from helpers import token_batches
        assert distributed.init_from_env()
        pissa.calibrate(tiny_llama(), token_batches(n=5), gradients=True, out=sys.argv[1] + "/two.safetensors")
        """,
        tmp_path,
        str(tmp_path),
    )
    pissa.calibrate(tiny_llama(), token_batches(n=5), gradients=True, out=tmp_path / "one.safetensors")
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys() and len(one) == 8 * 2 + 14
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    assert open_calibration(tmp_path / "two.safetensors").info == open_calibration(tmp_path / "one.safetensors").info


def test_cli_calibrate_writes_then_reuses_and_refuses_bad_input(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "stats.safetensors"
    args = ["calibrate", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--samples", "12",
            "--batch-size", "4", "--threads", "1", "--out", str(out)]
    assert main(args) == 0 and "wrote" in capsys.readouterr().out
    assert main(args) == 0 and "reused" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "more.safetensors"), "--samples", "100000"]) == 2
    assert "exceeds" in capsys.readouterr().err and not (tmp_path / "more.safetensors").exists()
    assert main([*args[:-1], str(tmp_path)]) == 2 and "folder" in capsys.readouterr().err
