"""Chat encoding (assistant-only targets), answer extraction, greedy batched generation and the
generation evaluation, on tiny random models; one run on the real SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pissa
from helpers import finetune, tokenizer_for
from pissa.cli import main
from pissa.data.answers import answers_match, extract_answer
from pissa.data.batches import collate
from pissa.data.datasets import Example, Message
from pissa.data.encoding import encode_all
from pissa.data.tasks import arithmetic_rows
from pissa.errors import PissaError
from pissa.inference.decoding import generate, merged_for_inference, score_and_generate
from pissa.training.evaluation import choose_eval, evaluate, evaluate_generation

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""A minimal chat template: every turn is <|role|>content<eos>."""

ROWS = arithmetic_rows(80)


def chat(*turns: tuple[str, str]) -> Example:
    """A chat example from (role, content) pairs (the last one the assistant's)."""
    messages = tuple(Message(r, c) for r, c in turns)
    return Example(json.dumps([[m.role, m.content] for m in messages[:-1]]), messages[-1].content, None, messages)


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for r in ROWS for m in r["messages"]] + ["<|system|><|user|><|assistant|> Be brief."]
    tokenizer = tokenizer_for(texts)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _llama(vocab: int, eos: int, pad: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=eos,
        pad_token_id=pad, bos_token_id=None)).eval()


# --- chat encoding ---------------------------------------------------------------------------------


def _runs(ids: tuple[int, ...], mask: tuple[bool, ...]) -> list[list[int]]:
    """The contiguous runs of target tokens."""
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ids, mask)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(t)
    return runs


def test_chat_targets_are_exactly_the_assistant_turns(tok) -> None:
    ex = chat(("system", "Be brief."), ("user", "Sam has 3 apples. How many?"), ("assistant", "3 + 0 = 3.\n#### 3"),
              ("user", "And twice as many?"), ("assistant", "Twice as many: 3 * 2 = 6.\n#### 6"))
    (item,) = encode_all(tok, [ex], None, "causal-lm", 512)
    assert item.mask is not None and len(item.mask) == len(item.ids) and item.label is None
    text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in ex.messages], tokenize=False)
    assert tok.decode(list(item.ids)) == text
    runs = [tok.decode(run) for run in _runs(item.ids, item.mask)]
    assert runs == ["3 + 0 = 3.\n#### 3<eos>", "Twice as many: 3 * 2 = 6.\n#### 6<eos>"]  # every assistant turn, only those
    assert item.n_targets == sum(item.mask) == sum(map(len, _runs(item.ids, item.mask)))
    context = [{"role": m.role, "content": m.content} for m in ex.messages[:-1]]
    assert tok.decode(list(item.ids[: item.n_prompt])) == tok.apply_chat_template(context, tokenize=False,
                                                                                   add_generation_prompt=True)
    batch = collate([item, encode_all(tok, [chat(("user", "Hi"), ("assistant", "Yo"))], None, "causal-lm", 64)[0]],
                    tok.pad_token_id, "causal-lm")
    assert batch.target_mask[0, : len(item.ids)].tolist() == list(item.mask)
    assert tok.decode(batch.input_ids[1][batch.target_mask[1]].tolist()) == "Yo<eos>"
    assert batch.targets == item.n_targets + len(tok("Yo<eos>", add_special_tokens=False)["input_ids"])


def test_long_chats_lose_their_start_then_the_end_of_the_last_reply(tok) -> None:
    ex = chat(("user", "Sam has 3 apples. Sam buys 4 more apples. How many apples does Sam have now?"),
              ("assistant", "Buying 4 more: 3 + 4 = 7.\n#### 7"))
    (full,) = encode_all(tok, [ex], None, "causal-lm", 512)
    n_reply = len(full.ids) - full.n_prompt
    with pytest.warns(UserWarning, match=f"1 of 1 chat examples exceed `max_length` {n_reply + 3} .*has {len(full.ids)} tokens"):
        (short,) = encode_all(tok, [ex], None, "causal-lm", n_reply + 3)  # the reply and 3 tokens of context
    assert short.ids == full.ids[-(n_reply + 3) :] and short.n_prompt == 3 and short.mask == (False,) * 3 + (True,) * n_reply
    with pytest.warns(UserWarning):
        (cut,) = encode_all(tok, [ex], None, "causal-lm", 4)  # even the reply is too long: one context token, its start
    assert cut.ids == full.ids[full.n_prompt - 1 : full.n_prompt + 3] and cut.n_prompt == 1 and cut.n_targets == 3


def test_chat_needs_a_chat_template_and_a_causal_lm(tok) -> None:
    ex = chat(("user", "Hi"), ("assistant", "Yo"))
    plain = tokenizer_for(["Hi Yo"])
    with pytest.raises(PissaError, match="needs a tokenizer with a chat template"):
        encode_all(plain, [ex], None, "causal-lm", 64)
    with pytest.raises(PissaError, match="causal LM only"):
        encode_all(tok, [ex], None, "seq-cls", 64)
    with pytest.raises(PissaError, match="cannot be mixed"):
        encode_all(tok, [ex, Example("Q:", " A", None)], None, "causal-lm", 64)
    broken = tokenizer_for(["Hi Yo"])
    broken.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(PissaError, match="chat template fails.*roles must alternate"):
        encode_all(broken, [ex], None, "causal-lm", 64)
    rewriting = tokenizer_for(["Hi Yo"])  # drops earlier assistant turns: they cannot be located
    rewriting.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}"
                               "{% endif %}{% endfor %}")
    with pytest.raises(PissaError, match="prefix"):
        encode_all(rewriting, [chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))], None,
                   "causal-lm", 64)


# --- answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,answer", [
    ("3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("so #### 12 apples, then #### 13", "13"),  # the last marked answer
    ("#### -5", "-5"),
    ("#### $ 40", "40"),
    ("The answer is: 42", "42"),
    ("the answer is 3.50 dollars", "3.5"),
    ("The answer is 12.0", "12"),
    ("#### 8\nThe answer is: 9", "8"),  # #### wins over 'the answer is'
    ("He has 3 apples and buys 4, so 7 in total.", "7"),  # the last number
    ("From 5-3 we get 2", "2"),
    ("ends with 10-4", "4"),  # a hyphen after a digit is not a minus sign
    ("it is -4 degrees", "-4"),
    ("####", None),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_answers_match() -> None:
    assert answers_match("Buying 2 more: 7 + 2 = 9.\n#### 9", "Buying 2 more: 7 + 2 = 9.\n#### 9")
    assert answers_match("so it is 9", "#### 9") and answers_match("The answer is: 9.0", "#### 9")
    assert not answers_match("#### 8", "#### 9") and not answers_match("I do not know", "#### 9")
    assert answers_match(" positive  review", "positive review")  # no number: whitespace-normalized text
    assert not answers_match("negative review", "positive review")


def test_choose_eval() -> None:
    marked, plain = ["x = 3.\n#### 3", "The answer is 4"], ["a good film", "#### 2"]
    assert choose_eval("auto", "causal-lm", None, marked, "d") == "generate"
    assert choose_eval("auto", "causal-lm", None, plain, "d") == "likelihood"  # not every reference is checkable
    assert choose_eval("auto", "causal-lm", [" a", " b"], marked, "d") == "likelihood"
    assert choose_eval("auto", "seq-cls", None, marked, "d") == "likelihood"
    assert choose_eval("likelihood", "causal-lm", None, marked, "d") == "likelihood"
    assert choose_eval("generate", "causal-lm", None, plain, "d") == "generate"
    for kind, labels in (("causal-lm", [" a", " b"]), ("seq-cls", None)):
        with pytest.raises(PissaError, match="`eval` generate needs"):
            choose_eval("generate", kind, labels, marked, "d")


# --- generation --------------------------------------------------------------------------------------


def test_batched_generation_equals_a_greedy_loop_one_prompt_at_a_time() -> None:
    """Left padding, batching by length and the KV cache change nothing: same tokens as argmax over full recomputes."""
    model = _llama(96, eos=95, pad=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 95, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1)]
    got = generate(model, prompts, pad_id=0, end_ids=[95], max_new_tokens=7, batch_size=3)
    with torch.no_grad():
        for prompt, out in zip(prompts, got):
            ids, new = list(prompt), []
            for _ in range(7):
                t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if t == 95:
                    break
                ids.append(t)
                new.append(t)
            assert out == new


def test_generation_eval_scores_exact_match_of_the_generated_answers(tok, monkeypatch) -> None:
    examples = [chat(("user", r["messages"][0]["content"]), ("assistant", r["messages"][1]["content"])) for r in ROWS[:4]]
    items = encode_all(tok, examples, None, "causal-lm", 256)
    refs = [e.completion for e in examples]
    answers = [r.splitlines()[-1] for r in refs]  # "#### N"
    forced = [f"Some work.\n{answers[0]}", f"{answers[1]}1", f"The answer is: {answers[2][5:]}", "I do not know"]
    model = _llama(len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id)
    real = score_and_generate
    seen: list[list[int]] = []

    def fake(model, items, **kwargs):
        total, count, _ = real(model, items, **kwargs)
        seen.extend(list(e.ids[: e.n_prompt]) for e in items)
        return total, count, [tok(text, add_special_tokens=False)["input_ids"] for text in forced]

    monkeypatch.setattr("pissa.training.evaluation.score_and_generate", fake)
    result = evaluate_generation(model, tok, items, refs, pad_id=tok.pad_token_id, max_new_tokens=64, batch_size=3)
    assert seen == [list(e.ids[: e.n_prompt]) for e in items]  # every prompt, once
    assert result["accuracy"] == pytest.approx(2 / 4)  # 0 and 2 match; 1 has an extra digit; 3 has no number
    assert result["loss"] == pytest.approx(evaluate(model, items, None, None, "causal-lm", tok.pad_token_id)["loss"])
    with pytest.raises(PissaError, match="one reference per example"):
        evaluate_generation(model, tok, items, refs[:3], pad_id=tok.pad_token_id, max_new_tokens=8)


def test_one_pass_scoring_equals_the_loss_pass_and_generation_apart(tok) -> None:
    """score_and_generate (contexts run once, the cache cropped to them) gives the teacher-forced loss of
    objective.evaluate and the tokens of generate, also for a chat whose earlier assistant turn is a target."""
    examples = [chat(("user", r["messages"][0]["content"]), ("assistant", r["messages"][1]["content"])) for r in ROWS[:5]]
    examples.append(chat(("user", "Sam has 3 apples. How many?"), ("assistant", "#### 3"), ("user", "And twice?"),
                         ("assistant", "3 * 2 = 6.\n#### 6")))
    items = encode_all(tok, examples, None, "causal-lm", 256)
    assert items[-1].mask is not None and any(items[-1].mask[: items[-1].n_prompt])  # a target inside the context
    model = _llama(len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id)
    for batch_size in (1, 4):
        total, count, outputs = score_and_generate(model, items, pad_id=tok.pad_token_id, end_ids=[tok.eos_token_id],
                                                              max_new_tokens=9, batch_size=batch_size)
        expected = evaluate(model, items, None, None, "causal-lm", tok.pad_token_id)
        assert count == sum(e.n_targets for e in items) and total / count == pytest.approx(expected["loss"], rel=1e-5)
        assert outputs == generate(model, [e.ids[: e.n_prompt] for e in items], pad_id=tok.pad_token_id,
                                   end_ids=[tok.eos_token_id], max_new_tokens=9, batch_size=2)


def test_generation_runs_on_a_merged_copy_of_the_adapted_layers(tok) -> None:
    """In float32 the adapted layers are swapped for merged ones while generating (same tokens), then put back."""

    model = _llama(len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id)
    pissa.attach(model, pissa.AdapterConfig(method="pissa", rank=4))
    with torch.no_grad():
        for _, layer in pissa.adapted_layers(model):
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))  # a trained-looking update
    layers = dict(pissa.adapted_layers(model))
    prompts = [list(e.ids[: e.n_prompt]) for e in encode_all(tok, [chat(("user", r["messages"][0]["content"]),
               ("assistant", r["messages"][1]["content"])) for r in ROWS[:4]], None, "causal-lm", 256)]
    adapted = generate(model, prompts, pad_id=tok.pad_token_id, end_ids=[tok.eos_token_id], max_new_tokens=8, batch_size=4)
    with merged_for_inference(model) as merged:
        assert merged and not list(pissa.adapted_layers(model))
        assert generate(model, prompts, pad_id=tok.pad_token_id, end_ids=[tok.eos_token_id], max_new_tokens=8,
                        batch_size=4) == adapted
    assert dict(pissa.adapted_layers(model)) == layers  # the very same layer objects again
    half = _llama(len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id).to(torch.bfloat16)
    pissa.attach(half, pissa.AdapterConfig(method="pissa", rank=4))
    with merged_for_inference(half) as merged:
        assert not merged  # a half-precision residual would be rounded: left as it is


# --- runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tiny: Path, tok, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose tokenizer has :data:`TEMPLATE`, and ``train.jsonl``/``held.jsonl`` of arithmetic rows."""
    root = tmp_path_factory.mktemp("chat")
    _llama(len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:60]))
    (root / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[60:]))
    return root


def _run(root: Path, out: Path, *extra: str) -> dict:
    args = ["finetune", "--model", str(root / "llama"), "--data", str(root / "train.jsonl"), "--rank", "2",
            "--steps", "2", "--batch-size", "2", "--eval-size", "4", "--warmup", "1", "--max-length", "256",
            "--max-new-tokens", "6", "--threads", "1", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_finetune_on_chat_data_evaluates_by_generation(chat_model: Path, tmp_path: Path) -> None:
    m = _run(chat_model, tmp_path / "auto")
    assert m["eval_kind"] == "generate" and m["accuracy_kind"] == "exact_match" and m["eval_examples"] == 4
    for key in ("eval_before", "eval_after"):
        assert set(m[key]) == {"loss", "accuracy"} and 0 <= m[key]["accuracy"] <= 1 and m[key]["loss"] > 0
    likelihood = _run(chat_model, tmp_path / "lik", "--eval", "likelihood")
    assert likelihood["eval_kind"] == "likelihood" and likelihood["accuracy_kind"] == "token"
    assert likelihood["eval_before"]["loss"] == pytest.approx(m["eval_before"]["loss"])  # the same teacher-forced loss
    held = _run(chat_model, tmp_path / "held", "--eval-data", str(chat_model / "held.jsonl"))
    assert held["eval_split"] == "eval_data" and held["train_examples"] == 60 and held["eval_examples"] == 4


def test_eval_dtype_flag_scores_in_bfloat16(chat_model: Path, tmp_path: Path) -> None:
    """--eval-dtype bfloat16 (a flag generated from RunConfig) reaches both evaluations: losses near float32's."""
    fp32 = _run(chat_model, tmp_path / "fp32")
    bf16 = _run(chat_model, tmp_path / "bf16", "--eval-dtype", "bfloat16")
    assert "eval_dtype: bfloat16" in (tmp_path / "bf16" / "config.yaml").read_text()
    for key in ("eval_before", "eval_after"):
        assert bf16[key]["loss"] != fp32[key]["loss"]  # it did score in bfloat16
        assert bf16[key]["loss"] == pytest.approx(fp32[key]["loss"], rel=0.02)
    lik = _run(chat_model, tmp_path / "lik", "--eval", "likelihood", "--eval-dtype", "bfloat16")
    assert lik["eval_before"]["loss"] == pytest.approx(bf16["eval_before"]["loss"], rel=1e-4)


def test_eval_options_refuse_bad_combinations(chat_model: Path, tiny: Path, tmp_path: Path, capsys) -> None:
    cases = [
        [*("--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl")), "--eval", "generate"],  # labelled
        ["--model", str(tiny / "llama"), "--data", str(chat_model / "train.jsonl")],  # no chat template
        ["--model", str(chat_model / "llama"), "--data", str(chat_model / "train.jsonl"),
         "--eval-data", str(tiny / "data.jsonl")],  # held-out data of another format
        ["--model", str(chat_model / "llama"), "--data", str(chat_model / "train.jsonl"),
         "--eval-data", str(chat_model / "held.jsonl"), "--val-size", "4"],
        ["--max-new-tokens", "0"],
    ]
    for extra in cases:
        out = tmp_path / "out"
        assert finetune(tiny, out, *extra) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("pissa: error: ") and "Traceback" not in err, err
        assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.slow
def test_smollm2_on_the_arithmetic_task_end_to_end(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, a few steps on the embedded arithmetic task, scored by greedy generation."""
    out = tmp_path / "arith"
    args = ["finetune", "--data", "arithmetic", "--steps", "2", "--batch-size", "2", "--eval-size", "4",
            "--lr", "1e-4", "--warmup", "1", "--targets", "q_proj,v_proj", "--max-length", "160",
            "--max-new-tokens", "64", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == "arithmetic" and m["eval_kind"] == "generate" and m["accuracy_kind"] == "exact_match"
    assert m["train_examples"] == 4000 and m["eval_examples"] == 4
    for key in ("eval_before", "eval_after"):
        assert 0 < m[key]["loss"] < 5 and m[key]["accuracy"] in (0, 0.25, 0.5, 0.75, 1)
