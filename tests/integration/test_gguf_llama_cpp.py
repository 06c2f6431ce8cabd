"""The GGUF export loaded by llama.cpp itself (llama-cpp-python) on the embedded SmolLM2 GGUF, against transformers.

pissa's SmolLM2 is that GGUF file dequantized, so both run the same weights; llama.cpp multiplies in its Q4_1
format (its base logits differ from transformers' by ~2%). The adapted model's logits in llama.cpp must match
transformers' adapted logits far better than llama.cpp's unadapted ones do; an adapter file with the q/k rows
left in Hugging Face's order (the converter's permutation skipped) misses that bar.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import torch

import pissa
from helpers import relative_error
from pissa.runtime import hub


def logits(gguf_model: str, ids: list[int], lora: str | None) -> torch.Tensor:
    llm = llama_cpp.Llama(gguf_model, lora_path=lora, logits_all=True, n_threads=1, n_ctx=64, verbose=False)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


def test_llama_cpp_runs_the_exported_adapter(tmp_path) -> None:
    model, tok = hub.load_model("smollm2")
    ids = tok("The movie was surprisingly good, and the acting", return_tensors="pt").input_ids
    pissa.attach(model, pissa.AdapterConfig(rank=8, targets="all-linear"))
    with torch.no_grad():  # a "trained" adapter: every factor moved off its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * p.std() * torch.randn_like(p))
        want = model(ids).logits[0]
    pissa.export_gguf(model, tmp_path / "adapter.gguf")
    entry = hub.EMBEDDED_MODELS["smollm2"]
    base_file = str(hub._package_dir("smollm2", entry) / entry.path)  # the GGUF file pissa's SmolLM2 comes from
    without = logits(base_file, ids[0].tolist(), None)
    adapted = logits(base_file, ids[0].tolist(), str(tmp_path / "adapter.gguf"))
    err, ignored = relative_error(adapted, want), relative_error(without, want)
    assert ignored > 0.15  # the adapter changes the logits a lot
    assert err < 0.3 * ignored, (err, ignored)  # measured 0.048 vs 0.228; q/k rows unpermuted: 0.084
    assert (adapted.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
