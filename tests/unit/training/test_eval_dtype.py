"""``--eval-dtype bfloat16``: the evaluations' matmuls on bfloat16 merged copies (pissa.inference.decoding
.merged_for_inference), close to float32's scores, with the model put back exactly; on tiny random Llamas."""

from __future__ import annotations

import pytest
import torch

import pissa
from pissa.errors import PissaError
from pissa.inference.decoding import CastLinear, generate, merged_for_inference
from pissa.options import resume_safe
from pissa.training.config import RunConfig
from pissa.training.evaluation import evaluate

VOCAB = 97


def _model(tied: bool, dtype: torch.dtype = torch.float32, **adapter):
    """A tiny random Llama, PiSSA rank 4 on every projection with B moved off its initial value."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, eos_token_id=VOCAB - 1,
        pad_token_id=0, bos_token_id=None)).to(dtype).eval()
    pissa.attach(model, pissa.AdapterConfig(method="pissa", rank=4, **adapter))
    with torch.no_grad():
        for _, layer in pissa.adapted_layers(model):
            layer.lora_B.add_(0.05 * layer.lora_B.abs().mean() * torch.randn_like(layer.lora_B))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (3, 20), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_ids()).logits.float()


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Max |difference| within ``rel`` of the logits' largest magnitude."""
    assert (got - want).abs().max() <= rel * want.abs().max()


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_merge_is_close_to_float32_and_puts_everything_back(tied: bool) -> None:
    model = _model(tied)
    before = _logits(model)
    modules = dict(model.named_modules())
    with merged_for_inference(model, torch.bfloat16) as merged:
        assert merged and not list(pissa.adapted_layers(model))
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear | CastLinear)]
        assert linears and all(isinstance(m, CastLinear) and m.weight.dtype == torch.bfloat16 for m in linears)
        assert isinstance(model.lm_head, CastLinear)  # the head too (a copy of the tied embedding when tied)
        floats = [p for p in model.parameters() if p.is_floating_point()]
        assert floats and all(p.dtype == torch.bfloat16 for p in floats)  # embedding and norms too: all bfloat16
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are left as they are
        with torch.no_grad():
            assert model(input_ids=_ids()).logits.dtype == torch.bfloat16
        inside = _logits(model)
    assert not torch.equal(inside, before)  # it did run in bfloat16
    _close(inside, before, rel=0.015)  # bfloat16 keeps 8 significant bits, in the weights and in every activation
    assert torch.equal(_logits(model), before)  # bit-identical after the block
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())  # the very same modules again
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@torch.no_grad()
def test_bfloat16_argmax_differs_only_where_float32_nearly_ties() -> None:
    """A bound on disagreement: the greedy token can change only where float32's top-2 margin is below twice
    the largest logit change; everywhere else (most positions) bfloat16 picks float32's token."""
    model = _model(tied=True)
    fp32 = _logits(model)
    with merged_for_inference(model, torch.bfloat16):
        bf16 = _logits(model)
    top2 = fp32.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (bf16 - fp32).abs().max()
    assert clear.float().mean() > 0.5
    assert torch.equal(bf16.argmax(-1)[clear], fp32.argmax(-1)[clear])
    prompts = [row[:n].tolist() for row, n in zip(_ids(), (4, 9, 13))]
    kwargs = dict(pad_id=0, end_ids=[VOCAB - 1], max_new_tokens=6, batch_size=3)
    want = generate(model, prompts, **kwargs)
    with merged_for_inference(model, torch.bfloat16):
        got = generate(model, prompts, **kwargs)
    assert len(got) == len(want) and all(len(g) <= 6 for g in got)
    assert sum(g[:1] == w[:1] for g, w in zip(got, want)) >= 2  # the first tokens, where margins allow


@pytest.mark.parametrize("case", ["bfloat16 base", "nf4 residual"])
def test_bfloat16_merge_of_a_half_base_and_of_a_4bit_residual(case: str) -> None:
    model = _model(False, torch.bfloat16) if case == "bfloat16 base" else _model(False, quantize="nf4")
    before = _logits(model)
    with merged_for_inference(model, torch.bfloat16) as merged:
        assert merged and not list(pissa.adapted_layers(model))
        inside = _logits(model)
    _close(inside, before, rel=0.015)
    assert torch.equal(_logits(model), before)


def test_sharded_models_are_left_as_they_are() -> None:
    model = _model(tied=False)
    next(model.parameters()).device_mesh = None  # what an FSDP2 DTensor parameter has
    with merged_for_inference(model, torch.bfloat16) as merged:
        assert not merged and len(list(pissa.adapted_layers(model))) == 14


def test_likelihood_evaluation_in_bfloat16() -> None:
    from pissa.data.encoding import Encoded

    model = _model(tied=True)
    items = [Encoded(tuple(row.tolist()), 8, None) for row in _ids()]
    fp32 = evaluate(model, items, None, None, "causal-lm", pad_id=0)
    bf16 = evaluate(model, items, None, None, "causal-lm", pad_id=0, dtype=torch.bfloat16)
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.01)
    assert evaluate(model, items, None, None, "causal-lm", pad_id=0) == fp32  # the model was put back


def test_eval_dtype_option() -> None:
    assert RunConfig().eval_dtype == "float32" and RunConfig(eval_dtype="bfloat16").eval_dtype == "bfloat16"
    with pytest.raises(PissaError, match="^`eval_dtype` must be float32 or bfloat16, got 'float16'$"):
        RunConfig(eval_dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(PissaError, match="`eval_dtype` bfloat16 merges"):
        RunConfig(eval_dtype="bfloat16", objective="dpo")
    assert "eval_dtype" not in resume_safe(RunConfig)  # it changes the evaluations a run records
    model = _model(tied=True)
    with pytest.raises(PissaError, match="`eval_dtype`"), merged_for_inference(model, torch.float16):
        pass
