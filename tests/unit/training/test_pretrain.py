"""``pissa pretrain`` on tiny Llamas: outputs and metrics, an exact LOST start with every channel, resume after a
crash equal to an uninterrupted run, the compacted vocabulary, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pissa.cli import main
from pissa.data.corpus import compact, corpus_texts, load_corpus, split_of
from pissa.runtime import hub
from pissa.training.architectures import LostLinear, build_llama, restructure
from pissa.training.pretrain import train_step

TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "48", "--rank", "8", "--vocab-size", "256",
        "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--warmup", "2", "--eval-rows", "4", "--threads", "1",
        "--lr", "3e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 600 documents of the embedded Rotten Tomatoes corpus as a .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    path.write_text("\n".join(corpus_texts("rotten_tomatoes")[:600]) + "\n")
    return path


def pretrain(corpus: Path, out: Path, *extra: str) -> int:
    return main(["pretrain", "--corpus", str(corpus), "--out", str(out), *TINY, *extra])


def test_every_architecture_trains_and_writes_its_outputs(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert pretrain(corpus, out, "--sparse-channels", "0.25") == 0
    report = (out / "report.md").read_text()
    results = {}
    for arch in ("full", "low-rank", "lost"):
        m = json.loads((out / arch / "metrics.json").read_text())
        results[arch] = m
        assert m["architecture"] == arch and m["tokens"] == 6 * 4 * 32 and len(m["train_loss"]) == 6
        assert m["validation"]["loss"] < m["validation_before"]["loss"]
        assert m["optimizer_state_bytes"] > 0 and m["tokens_per_second"] > 0 and m["vocab_size"] == 256
        weights = load_file(str(out / arch / "model.safetensors"))
        assert sum(t.numel() for k, t in weights.items() if not k.endswith("index")) == m["params"]
        assert f"| {arch} | adamw |" in report
    # decoder linears: full 4 x 32x32 + 3 x 32x48; low-rank r (in + out) each; lost adds 8 (q,k,v,o,gate,up) or 12 columns
    assert results["full"]["linear_params"] == 4 * 32 * 32 + 3 * 32 * 48
    low = 4 * 8 * 64 + 3 * 8 * 80
    assert results["low-rank"]["linear_params"] == low
    assert results["lost"]["linear_params"] == low + 4 * 32 * 8 + 2 * 48 * 8 + 32 * 12
    # AdamW keeps two moments per parameter (plus a step count per tensor)
    assert results["full"]["optimizer_state_bytes"] > results["lost"]["optimizer_state_bytes"] > \
        results["low-rank"]["optimizer_state_bytes"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "vocabulary.json").read_text())) == 255
    assert not (tmp_path / "run.partial").exists()


def test_lost_with_every_channel_computes_the_dense_model() -> None:
    dense = build_llama(64, 2, 32, 2, 48, 16, seed=3)
    lost = restructure(build_llama(64, 2, 32, 2, 48, 16, seed=3), "lost", rank=4, sparse_channels=1.0)
    low = restructure(build_llama(64, 2, 32, 2, 48, 16, seed=3), "low-rank", rank=4, sparse_channels=1.0)
    assert sum(isinstance(m, LostLinear) for m in lost.modules()) == 2 * 7
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(ids).logits
        assert torch.allclose(lost(ids).logits, want, atol=1e-5)
        assert not torch.allclose(low(ids).logits, want, atol=1e-3)


def test_resume_after_a_crash_equals_an_uninterrupted_run(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    args = ("--architecture", "lost,full", "--save-every", "2")
    assert pretrain(corpus, tmp_path / "whole", *args) == 0
    calls = [0]

    def crashing_step(*a, **kw):
        calls[0] += 1
        if calls[0] == 6 + 4:  # lost finished, full crashes in its 4th step, after the checkpoint of step 2
            raise RuntimeError("killed")
        return train_step(*a, **kw)

    monkeypatch.setattr("pissa.training.pretrain.train_step", crashing_step)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(corpus, tmp_path / "split", *args)
    partial = tmp_path / "split.partial"
    assert (partial / "lost" / "metrics.json").is_file()
    assert json.loads((partial / "full/checkpoint/state.json").read_text())["progress"]["step"] == 2
    monkeypatch.setattr("pissa.training.pretrain.train_step", train_step)
    assert pretrain(corpus, tmp_path / "split", *args, "--lr", "1e-2", "--resume") == 2  # contradicts the run
    assert main(["pretrain", "--out", str(tmp_path / "split"), "--resume", "--threads", "1"]) == 0
    for arch in ("lost", "full"):
        a = load_file(str(tmp_path / "whole" / arch / "model.safetensors"))
        b = load_file(str(tmp_path / "split" / arch / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ma, mb = (json.loads((tmp_path / d / arch / "metrics.json").read_text()) for d in ("whole", "split"))
        assert ma["train_loss"] == mb["train_loss"] and ma["validation"] == mb["validation"]


@pytest.mark.parametrize(("extra", "message"), [
    (("--rank", "32"), "--rank 32 must be below --hidden 32"),
    (("--sparse-channels", "1.5"), "--sparse-channels must be a fraction in [0, 1] or a whole count > 1"),
    (("--sparse-channels", "-0.2"), "--sparse-channels must be a fraction in [0, 1]"),
    (("--architecture", "sparse"), "--architecture must be among full, low-rank, lost"),
    (("--optimizer", "sgd"), "--optimizer"),
    (("--optimizer", "galore"), "--optimizer galore projects the gradients of whole weights"),
    (("--heads", "3"), "--heads 3 must divide --hidden 32"),
    (("--corpus", "missing.txt"), "--corpus must be rotten_tomatoes or an existing .txt file"),
])
def test_bad_input_is_one_line_and_writes_nothing(corpus: Path, tmp_path: Path, capsys, extra, message) -> None:
    args = ["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "bad"), *TINY, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_corpus_splits_and_compact_vocabulary(corpus: Path) -> None:
    tokenizer = hub.load_tokenizer("smollm2")
    full = load_corpus(str(corpus), tokenizer, 16, 0.1, 0.1)
    small = load_corpus(str(corpus), tokenizer, 16, 0.1, 0.1, vocab_size=100)
    assert full.vocabulary is None and small.vocab_size == 100
    assert full.train.shape == small.train.shape and int(small.train.max()) <= 99
    kept = small.vocabulary
    assert kept is not None and torch.equal(kept, compact(full.train, 100))
    # a kept token maps to its position; every other token to the unknown id 99
    inside = torch.isin(full.train, kept)
    assert torch.equal(small.train[~inside], torch.full_like(small.train[~inside], 99))
    assert torch.equal(kept[small.train[inside]], full.train[inside])
    texts = corpus_texts(str(corpus))
    assert sum(split_of(t, 0.1, 0.1) == "validation" for t in texts) == full.documents["validation"]
