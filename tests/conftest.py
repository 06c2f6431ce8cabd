"""Fixtures shared by every test: a fixed torch seed, and a tiny model folder with data for whole command runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tiny_folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Multi-process runs (tests/distributed/) belong to the full suite, not the fast inner loop."""
    for item in items:
        if "distributed" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``llama/`` (tiny random LlamaForCausalLM + tokenizer), ``bert/`` (tiny BERT),
    ``data.jsonl`` (text,label) and ``free.jsonl`` (prompt,completion)."""
    return tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def one_thread():
    """The workers run with one thread each; the single-process reference must round the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
