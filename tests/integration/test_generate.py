"""``pissa generate``: greedy output equal to ``model.generate``, incremental streaming, adapters, the chat
template, --chat history and interrupts, one-line errors, on the tiny random Llama; one chat on the real SmolLM2 (slow)."""

from __future__ import annotations

import builtins
import io
import shutil
from pathlib import Path

import pytest
import torch

import pissa
from pissa.adapter.attach import adapted_layers
from pissa.cli import main
from pissa.inference.chat import Streamer, load, render, reply
from pissa.inference.config import GenerateConfig
from pissa.runtime.hub import load_model

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""A minimal chat template: every turn is <|role|>content<eos>."""

PROMPT = "the movie was"
FAST = ["--max-new-tokens", "12", "--threads", "1"]


def _expected(model, tok, ids: list[int], n: int = 12) -> str:
    """What ``model.generate(do_sample=False)`` continues ``ids`` with, decoded."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def _adapter(model_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A PiSSA adapter on ``model_dir`` whose trainable factors were moved away from their init, saved to ``out``."""
    model, _ = load_model(str(model_dir), dtype=dtype)
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.add_(0.5 * torch.randn(layer.lora_B.shape, generator=g))
    return pissa.save_adapter(model, out)


@pytest.fixture(scope="module")
def templated(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a chat template."""
    folder = tmp_path_factory.mktemp("templated") / "llama"
    shutil.copytree(tiny / "llama", folder)
    _, tok = load_model(str(folder))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _adapter(tiny / "llama", tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[dict[str, str]], str]]:
    """Every ``(messages, rendered text)`` that render produces during the test."""
    seen: list[tuple[list[dict[str, str]], str]] = []
    real = render

    def spy(tokenizer, messages):
        text = real(tokenizer, messages)
        seen.append(([dict(m) for m in messages], text))
        return text

    monkeypatch.setattr("pissa.inference.chat.render", spy)
    return seen


def test_greedy_output_is_model_generate_and_the_prompt_may_come_from_stdin(tiny: Path, capsys, monkeypatch) -> None:
    model, tok = load_model(str(tiny / "llama"))
    expected = _expected(model, tok, tok(PROMPT)["input_ids"])
    assert expected.strip()
    assert main(["generate", "--model", str(tiny / "llama"), *FAST, PROMPT]) == 0
    assert capsys.readouterr().out == expected + "\n"
    for args in (["-"], []):  # the prompt from stdin, with one trailing newline dropped
        monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
        assert main(["generate", "--model", str(tiny / "llama"), *FAST, *args]) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_the_reply_streams_token_by_token(tiny: Path) -> None:
    model, tok = load_model(str(tiny / "llama"))
    ids = tok(PROMPT)["input_ids"]
    pieces: list[tuple[str, int]] = []  # (text, tokens generated when it was emitted)
    streamer = Streamer(tok, lambda text: pieces.append((text, len(streamer.ids))))
    reply(model, tok, ids, GenerateConfig(max_new_tokens=12, threads=1), streamer)
    assert len(pieces) > 1 and pieces[0][1] < len(streamer.ids)  # the first piece came before the last token
    assert "".join(p for p, _ in pieces) == streamer.text == _expected(model, tok, ids)


def test_the_adapter_changes_the_output_and_its_recorded_base_is_used(tiny: Path, adapter: Path, capsys) -> None:
    assert main(["generate", "--model", str(tiny / "llama"), *FAST, PROMPT]) == 0
    base = capsys.readouterr().out
    assert main(["generate", "--adapter", str(adapter), *FAST, PROMPT]) == 0  # no --model: the adapter's base
    adapted = capsys.readouterr().out
    model, tok = load_model(str(tiny / "llama"))
    pissa.load_adapter(model, adapter)
    assert adapted == _expected(model.eval(), tok, tok(PROMPT)["input_ids"]) + "\n"
    assert adapted != base


def test_an_adapter_loads_whatever_dtype_it_was_made_on(tiny: Path, adapter: Path, tmp_path: Path, capsys) -> None:
    model, _ = load(GenerateConfig(adapter=str(adapter), dtype="bfloat16", threads=1))
    layer = next(adapted_layers(model))[1]
    assert layer.residual.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    half = _adapter(tiny / "llama", tmp_path / "half", torch.bfloat16)  # made by a --dtype bfloat16 run
    model, _ = load(GenerateConfig(adapter=str(half), threads=1))
    assert next(adapted_layers(model))[1].residual.weight.dtype == torch.float32
    assert main(["generate", "--adapter", str(half), "--dtype", "bfloat16", *FAST, PROMPT]) == 0
    assert capsys.readouterr().out.strip()


def test_a_plain_prompt_is_rendered_with_the_chat_template_unless_raw(templated: Path, renders, capsys) -> None:
    model, tok = load_model(str(templated))
    assert main(["generate", "--model", str(templated), "--system", "Be brief.", *FAST, PROMPT]) == 0
    assert renders == [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
                        f"<|system|>Be brief.<eos><|user|>{PROMPT}<eos><|assistant|>")]
    ids = tok(renders[0][1], add_special_tokens=False)["input_ids"]
    assert capsys.readouterr().out == _expected(model, tok, ids) + "\n"
    assert main(["generate", "--model", str(templated), "--raw", *FAST, PROMPT]) == 0
    assert len(renders) == 1 and capsys.readouterr().out == _expected(model, tok, tok(PROMPT)["input_ids"]) + "\n"


def test_chat_keeps_the_history_and_ends_at_the_end_of_input(templated: Path, renders, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nand again\n"))  # the blank line is skipped
    assert main(["generate", "--chat", "--model", str(templated), *FAST]) == 0
    out = capsys.readouterr().out
    assert len(renders) == 2
    (first, _), (second, text) = renders
    assert first == [{"role": "user", "content": "hello there"}]
    answer = second[1]["content"]
    assert second == [first[0], {"role": "assistant", "content": answer}, {"role": "user", "content": "and again"}]
    assert answer and out.startswith(answer + "\n") and f"<|assistant|>{answer}<eos>" in text
    assert out.count("\n") >= 2


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on_then_ends_at_the_prompt(templated: Path, renders, monkeypatch,
                                                                           capsys) -> None:
    lines: list[str | type[BaseException]] = ["one", "two", KeyboardInterrupt]

    def scripted(prompt: str = "") -> str:
        line = lines.pop(0)
        if isinstance(line, str):
            return line
        raise line()

    real, calls = reply, []

    def interrupted_once(model, tok, ids, cfg, streamer):
        calls.append(ids)
        if len(calls) == 1:
            streamer.emit("partial")
            streamer.text = "partial"
            raise KeyboardInterrupt
        return real(model, tok, ids, cfg, streamer)

    monkeypatch.setattr(builtins, "input", scripted)
    monkeypatch.setattr("pissa.cli.generate.reply", interrupted_once)
    assert main(["generate", "--chat", "--model", str(templated), *FAST]) == 0
    captured = capsys.readouterr()
    assert len(calls) == 2 and "(reply stopped)" in captured.err and captured.out.startswith("partial\n")
    assert renders[1][0][1] == {"role": "assistant", "content": "partial"} and not lines


@pytest.fixture(scope="module")
def other(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with one weight changed: another base."""
    folder = tmp_path_factory.mktemp("other") / "llama"
    model, tok = load_model(str(tiny / "llama"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (["--model", "{tmp}/nope", PROMPT], "", "does not exist"),
    (["--model", "{other}", "--adapter", "{adapter}", PROMPT], "", "different base model"),
    (["--model", "{bert}", PROMPT], "", "needs a causal language model"),
    (["--model", "{llama}", "--chat"], "hi\n", "--chat needs a tokenizer with a chat template"),
    (["--model", "{llama}", "--system", "x", PROMPT], "", "--system needs a tokenizer with a chat template"),
    (["--model", "{llama}", " \n"], "", "the prompt is empty"),
    (["--model", "{llama}"], "\n", "the prompt is empty"),
    (["--model", "{llama}", "--chat", "--raw"], "", "drop --raw"),
    (["--model", "{llama}", "--temperature", "-1", PROMPT], "", "--temperature must be >= 0"),
    (["--model", "{llama}", "--max-new-tokens", "0", PROMPT], "", "--max-new-tokens must be an integer >= 1"),
    (["--model", "{llama}", "--device", "cuda:99", PROMPT], "", "--device cuda:99"),
    (["--model", "{llama}", PROMPT * 200], "", "fills the model's context of 128"),
])
def test_bad_input_is_one_line_and_exit_2_with_no_output(tiny: Path, adapter: Path, other: Path, tmp_path: Path,
                                                          monkeypatch, capsys, args, stdin, message) -> None:
    paths = {"tmp": tmp_path, "other": other, "adapter": adapter, "bert": tiny / "bert", "llama": tiny / "llama"}
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["generate", "--threads", "1", *(a.format(**paths) for a in args)]) == 2
    captured = capsys.readouterr()
    last = captured.err.splitlines()[-1]  # (transformers may draw its loading bar above it)
    assert captured.out == "" and last.startswith("pissa: error: ") and message in last


@pytest.mark.slow
def test_smollm2_chat(monkeypatch, capsys) -> None:
    """The real SmolLM2-135M-Instruct: two chat turns of a few tokens each."""
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\nAnd 3+3?\n"))
    assert main(["generate", "--chat", "--max-new-tokens", "8", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.strip()]) >= 2


def test_two_adapters_on_one_base_switch_in_the_chat(templated: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """``--adapter a --adapter b``: the replies after ``/adapter b`` are those of b loaded alone, the base loaded once."""
    a = _adapter(templated, tmp_path / "a")
    model, _ = load_model(str(templated))
    pissa.attach(model, pissa.AdapterConfig(method="lora", rank=2, seed=3))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.add_(0.3 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)))
    b = pissa.save_adapter(model, tmp_path / "b")
    alone = {}
    for name, folder in (("a", a), ("b", b)):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
        assert main(["generate", "--chat", "--model", str(templated), "--adapter", str(folder), *FAST]) == 0
        alone[name] = capsys.readouterr().out
    assert alone["a"] != alone["b"]
    loads = []
    monkeypatch.setattr("pissa.inference.chat.hub.load_model", lambda *a, **k: loads.append(1) or load_model(*a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/adapter b\n/adapter\n/adapter c\n/adapter a\n"))
    assert main(["generate", "--chat", "--model", str(templated), "--adapter", str(a), "--adapter", str(b), *FAST]) == 0
    out, err = capsys.readouterr()
    assert out == alone["a"]  # history aside, the first reply is a's
    assert "adapters: *b, a" in err and "adapter 'c' is not an adapter of this model (it has: b, a)" in err
    assert "adapters: *a, b" in err and loads == [1]
    monkeypatch.setattr("sys.stdin", io.StringIO("/adapter b\nhello there\n"))
    assert main(["generate", "--chat", "--model", str(templated), "--adapter", str(a), "--adapter", str(b), *FAST]) == 0
    assert capsys.readouterr().out == alone["b"]
