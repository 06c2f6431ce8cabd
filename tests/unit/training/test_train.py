"""The fine-tuning loop on a tiny random Llama and tiny data: loss goes down, metrics schema,
resume equality (after a crash and after Ctrl-C), compare, seq-cls head, scoring, Trainer."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import finetune, sentiment_rows
from pissa.adapter.config import AdapterConfig
from pissa.cli import main
from pissa.data.batches import collate
from pissa.data.datasets import Example, load_data
from pissa.data.encoding import encode
from pissa.files.card import read_card
from pissa.training.checkpoint import WEIGHTS
from pissa.training.config import RunConfig
from pissa.training.evaluation import evaluate
from pissa.training.loop import train_step
from pissa.training.schedule import lr_at, step_indices
from pissa.training.session import START_TOLERANCE, Session, start_check, starts_at_base

METRIC_KEYS = {"method", "model", "data", "rank", "steps", "lr", "train_loss", "eval_before", "eval_after",
               "trainable_params", "seconds"}


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


# --- pure parts ----------------------------------------------------------------------------------


def test_step_indices_are_a_pure_function_covering_each_epoch() -> None:
    n, count = 12, 4
    assert step_indices(n, 0, 5, count) == step_indices(n, 0, 5, count)
    epoch = [i for s in range(n // count) for i in step_indices(n, 0, s, count)]
    assert sorted(epoch) == list(range(n))
    assert step_indices(n, 0, 0, count) != step_indices(n, 1, 0, count)
    across = step_indices(10, 0, 2, 4)  # positions 8..11 straddle epochs 0 and 1
    assert across[:2] == step_indices(10, 0, 0, 10)[8:] and across[2:] == step_indices(10, 0, 1, 10)[:2]


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = RunConfig(lr=1e-3, steps=100, warmup=10, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(55, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) < 1e-5
    cfg.schedule = "constant"
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert RunConfig(adapter=pissa.AdapterConfig(method="lora")).learning_rate > RunConfig().learning_rate


def test_encode_masks_the_prompt_and_truncates_its_start(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "llama")
    ex = Example("Text: great movie and a plot of the story\nLabel:", " positive", "positive")
    full = encode(tok, ex, [" negative", " positive"], "causal-lm", 256)
    short = encode(tok, ex, [" negative", " positive"], "causal-lm", 6)
    completion = tok(" positive", add_special_tokens=False)["input_ids"]
    assert list(full.ids[full.n_prompt :]) == completion and full.label == 1
    assert len(short.ids) == 6 and short.ids[-len(completion) :] == full.ids[-len(completion) :]
    assert short.ids[: short.n_prompt] == full.ids[full.n_prompt - short.n_prompt : full.n_prompt]
    batch = collate([full, short], tok.pad_token_id, "causal-lm")
    assert batch.target_mask.sum() == 2 * len(completion) and batch.targets == 2 * len(completion)


@pytest.mark.parametrize("labels", [[" positive", " negative"], [" so positive", " very negative indeed"]])
def test_label_scoring_matches_brute_force(tiny: Path, labels: list[str]) -> None:
    """evaluate() (logits only at completion positions, batched) == full-logit scoring one sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "llama")
    model = AutoModelForCausalLM.from_pretrained(tiny / "llama")
    rows = sentiment_rows(6)
    examples = [Example(f"Text: {r['text']}\nLabel:", labels[i % 2], labels[i % 2].strip()) for i, r in enumerate(rows)]
    items = [encode(tok, e, labels, "causal-lm", 64) for e in examples]
    label_ids = [tok(label, add_special_tokens=False)["input_ids"] for label in labels]
    got = evaluate(model, items, labels, label_ids, "causal-lm", tok.pad_token_id, batch_size=4)
    scores, nll, n = [], 0.0, 0
    with torch.no_grad():
        for item in items:
            prompt = list(item.ids[: item.n_prompt])
            row = []
            for ids in label_ids:
                logp = model(input_ids=torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
                row.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(ids)))
            scores.append(row)
            nll -= row[item.label]
            n += len(label_ids[item.label])
    accuracy = sum(max(range(len(r)), key=r.__getitem__) == it.label for r, it in zip(scores, items)) / len(items)
    assert got["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert got["accuracy"] == pytest.approx(accuracy)


# --- whole runs ----------------------------------------------------------------------------------


def test_finetune_lowers_the_loss_and_writes_the_outputs(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert finetune(tiny, out, "--steps", "30", "--schedule", "constant") == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.yaml", "loss.png", "metrics.json"]
    assert not (tmp_path / "run.partial").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= METRIC_KEYS
    assert m["method"] == "pissa" and m["rank"] == 4 and m["steps"] == 30 and m["lr"] == 1e-2
    assert [s for s, _ in m["train_loss"]] == list(range(1, 31))
    for key in ("eval_before", "eval_after"):
        assert set(m[key]) == {"loss", "accuracy"} and 0 <= m[key]["accuracy"] <= 1
    first = sum(loss for _, loss in m["train_loss"][:5]) / 5
    last = sum(loss for _, loss in m["train_loss"][-5:]) / 5
    assert last < first
    assert m["eval_after"]["loss"] < m["eval_before"]["loss"]
    assert m["trainable_params"] == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)  # 2 layers x r x sum of (in + out)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model = pissa.load_adapter(_llama(tiny), out / "adapter")  # the saved adapter loads on the base model
    assert pissa.trainable_parameters(model) == m["trainable_params"]


def _llama(tiny: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny / "llama")


def test_free_text_data_trains_with_token_accuracy(tiny: Path, tmp_path: Path) -> None:
    assert finetune(tiny, tmp_path / "free", "--data", str(tiny / "free.jsonl"), "--steps", "4") == 0
    m = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert m["accuracy_kind"] == "token" and 0 <= m["eval_after"]["accuracy"] <= 1


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    assert finetune(tiny, tmp_path / "whole", "--save-every", "0") == 0
    real_step = crash_at_step(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(tiny, tmp_path / "split", "--save-every", "4")
    assert json.loads((tmp_path / "split.partial/checkpoint/state.json").read_text())["progress"]["step"] == 4
    assert not (tmp_path / "split").exists()
    monkeypatch.setattr("pissa.training.loop.train_step", real_step)
    assert finetune(tiny, tmp_path / "split", "--save-every", "4", "--resume") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "split")


def test_ctrl_c_checkpoints_exits_130_and_resumes_exactly(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    assert finetune(tiny, tmp_path / "whole", "--save-every", "0") == 0
    real_step, calls = train_step, [0]

    def interrupted_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the step still finishes, then the loop checkpoints
        return real_step(*args, **kwargs)

    monkeypatch.setattr("pissa.training.loop.train_step", interrupted_step)
    assert finetune(tiny, tmp_path / "split", "--save-every", "0") == 130
    assert "continue with --resume" in capsys.readouterr().out
    assert json.loads((tmp_path / "split.partial/checkpoint/state.json").read_text())["progress"]["step"] == 3
    monkeypatch.setattr("pissa.training.loop.train_step", real_step)
    assert finetune(tiny, tmp_path / "split", "--save-every", "0", "--lr", "1e-3", "--resume") == 2  # contradicts
    assert "differs from the interrupted run" in capsys.readouterr().err
    assert finetune(tiny, tmp_path / "split", "--resume") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "split")
    assert finetune(tiny, tmp_path / "split", "--resume") == 2  # finished: nothing to resume


def crash_at_step(monkeypatch, step: int):
    """Make the ``step``-th call of train_step raise RuntimeError("killed"); returns the real train_step."""
    real_step, calls = train_step, [0]

    def crashing_step(*a, **kw):
        calls[0] += 1
        if calls[0] == step:
            raise RuntimeError("killed")
        return real_step(*a, **kw)

    monkeypatch.setattr("pissa.training.loop.train_step", crashing_step)
    return real_step


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) <= 1e-6
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert [s for s, _ in mb["train_loss"]] == list(range(1, 9))
    assert [loss for _, loss in ma["train_loss"]] == pytest.approx([loss for _, loss in mb["train_loss"]], abs=1e-6)
    assert ma["eval_after"] == pytest.approx(mb["eval_after"], abs=1e-6)


def test_compare_writes_report_plot_and_one_folder_per_method(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "pissa,lora", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"),
            "--rank", "4", "--steps", "6", "--batch-size", "4", "--eval-size", "8", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for method in ("pissa", "lora"):  # each at its record's default rate
        assert f"| {method} | {pissa.METHODS[method].learning_rate:g} |" in report
    assert "loss@6 (end)" in report
    assert (out / "loss.png").is_file()
    for method in ("pissa", "lora"):
        m = json.loads((out / method / "metrics.json").read_text())
        assert m["method"] == method and (out / method / "adapter" / "adapter_config.json").is_file()
        card, body = read_card(out / method / "adapter")  # each method's adapter has its card, with the command
        assert card["library_name"] == "pissa" and method in card["tags"] and "pissa compare --methods pissa,lora" in body
        assert f"- learning rate: {m['lr']:g}" in body and f"| after training | {m['eval_after']['accuracy']:.4f}" in body
    a, b = (json.loads((out / m / "metrics.json").read_text()) for m in ("pissa", "lora"))
    assert a["eval_before"] == pytest.approx(b["eval_before"], abs=1e-5)  # both start from the base model's function


def test_seq_cls_trains_the_head_and_saves_it_with_the_adapter(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "cls"
    assert finetune(tiny, out, "--model", str(tiny / "bert"), "--steps", "6") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "seq-cls"
    head = load_file(str(out / "adapter" / "head.safetensors"))
    assert {k.split(".")[0] for k in head} == {"classifier"}
    assert m["trainable_params"] > sum(t.numel() for t in head.values())
    torch.manual_seed(123)  # a different fresh head: loading must overwrite it
    model = AutoModelForSequenceClassification.from_pretrained(tiny / "bert", num_labels=2)
    pissa.load_adapter(model, out / "adapter")
    assert torch.equal(model.classifier.weight, head["classifier.weight"])
    assert pissa.trainable_parameters(model) == m["trainable_params"]


# --- bad input: one line on stderr, exit 2, nothing written --------------------------------------


def _bad_files(tiny: Path, tmp: Path) -> dict[str, list[str]]:
    (tmp / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{not json\n')
    (tmp / "empty.csv").write_text("")
    (tmp / "cols.csv").write_text("question,answer\nwhat,that\nwho,them\n")
    return {
        "missing model": ["--model", str(tmp / "nope")],
        "unknown method": ["--method", "dora"],
        "rank 0": ["--rank", "0"],
        "rank too big": ["--rank", "33"],
        "negative steps": ["--steps", "-1"],
        "malformed data": ["--data", str(tmp / "bad.jsonl")],
        "empty data": ["--data", str(tmp / "empty.csv")],
        "unknown columns": ["--data", str(tmp / "cols.csv")],
        "missing data": ["--data", str(tmp / "nope.jsonl")],
        "free text for a classifier": ["--model", str(tiny / "bert"), "--data", str(tiny / "free.jsonl")],
    }


BAD_CASES = ["missing model", "unknown method", "rank 0", "rank too big", "negative steps", "malformed data",
             "empty data", "unknown columns", "missing data", "free text for a classifier"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_no_output(case: str, tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert finetune(tiny, out, *_bad_files(tiny, tmp_path)[case]) == 2
    err = capsys.readouterr().err  # may hold model-loading progress bars before the error
    assert err.endswith("\n") and err.splitlines()[-1].startswith("pissa: error: ")
    assert err.count("pissa: error:") == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_bad_compare_methods_write_nothing(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "pissa,nope", "--model", str(tiny / "llama"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err and not out.exists() and not (tmp_path / "cmp.partial").exists()


# --- transformers.Trainer on a pissa-attached model ----------------------------------------------


def test_hf_trainer_trains_a_pissa_model(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from helpers import tiny_llama

    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (4, 12), generator=g)]  # one batch
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    pissa.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()


# --- the real embedded model ---------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct on Rotten Tomatoes for a few steps (q/v projections only, to stay quick)."""
    out = tmp_path / "real"
    args = ["finetune", "--steps", "2", "--batch-size", "2", "--eval-size", "4", "--lr", "1e-3", "--warmup", "1",
            "--targets", "q_proj,v_proj", "--max-length", "40", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "smollm2" and m["data"] == "rotten_tomatoes" and m["accuracy_kind"] == "label"
    assert m["eval_after"]["loss"] < m["eval_before"]["loss"]  # the label words become likely at once
    assert m["trainable_params"] == 30 * 16 * ((576 + 576) + (576 + 192))
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "loss.png").is_file()


def test_validation_split_is_carved_from_training_data_and_never_touches_the_test_split(tiny: Path) -> None:
    full = load_data(str(tiny / "data.jsonl"))
    carved = load_data(str(tiny / "data.jsonl"), val_size=20)
    test_prompts = {e.prompt for e in full.test}
    assert 20 <= len(carved.test) < 25 and not test_prompts & {e.prompt for e in carved.test}
    assert {e.prompt for e in carved.train} | {e.prompt for e in carved.test} == {e.prompt for e in full.train}


def test_val_size_runs_score_the_validation_split(tiny: Path, tmp_path: Path) -> None:
    assert finetune(tiny, tmp_path / "val", "--val-size", "20", "--eval-size", "20", "--steps", "2") == 0
    m = json.loads((tmp_path / "val" / "metrics.json").read_text())
    full = load_data(str(tiny / "data.jsonl"))
    assert m["eval_split"] == "validation" and m["eval_examples"] == 20 and m["train_examples"] <= len(full.train) - 20


# --- devices and precision ---------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_run(tiny: Path, tmp_path: Path) -> None:
    """Recomputing activations in backward changes memory, not the math: same adapter, same losses."""
    assert finetune(tiny, tmp_path / "plain", "--steps", "4", "--dropout", "0.0") == 0
    assert finetune(tiny, tmp_path / "ckpt", "--steps", "4", "--gradient-checkpointing") == 0
    a, b = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "ckpt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma, mb = (json.loads((tmp_path / p / "metrics.json").read_text()) for p in ("plain", "ckpt"))
    assert [x for _, x in ma["train_loss"]] == pytest.approx([x for _, x in mb["train_loss"]], abs=1e-6)
    assert mb["gradient_checkpointing"] is True and mb["device"] == "cpu"


def test_gradient_checkpointing_gradients_equal_plain_gradients() -> None:
    from helpers import TOKENS, lm_loss, tiny_llama

    grads = []
    for checkpointing in (False, True):
        model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, dropout=0.0))
        model.train()
        if checkpointing:
            from pissa.runtime.devices import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        lm_loss(model, TOKENS).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5) for k in grads[0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_trains_with_float32_factors(tiny: Path, tmp_path: Path, dtype: str) -> None:
    """A half-precision base under CPU autocast (float16 with a gradient scaler) starts where the float32 run
    starts (the residual is rounded once) and learns; the factors stay float32."""
    assert finetune(tiny, tmp_path / "fp32", "--steps", "6") == 0
    assert finetune(tiny, tmp_path / dtype, "--steps", "6", "--dtype", dtype, "--gradient-checkpointing") == 0
    ref, half = (json.loads((tmp_path / p / "metrics.json").read_text()) for p in ("fp32", dtype))
    assert half["dtype"] == dtype
    assert half["eval_before"]["loss"] == pytest.approx(ref["eval_before"]["loss"], rel=5e-2)
    assert half["train_loss"][0][1] == pytest.approx(ref["train_loss"][0][1], rel=5e-2)
    assert half["eval_after"]["loss"] < half["eval_before"]["loss"]
    tensors = adapter_tensors(tmp_path / dtype)
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("command", ["finetune", "init", "analyze spectrum", "analyze quant-error"])
def test_an_unavailable_device_is_one_line_exit_2(tiny: Path, tmp_path: Path, capsys, command: str) -> None:
    from pissa.cli import main

    bad = "cuda" if not torch.cuda.is_available() else "cuda:99"
    out = tmp_path / "x"
    if command == "finetune":
        code = finetune(tiny, out, "--device", bad)
    else:
        assert finetune(tiny, tmp_path / "run", "--steps", "1") == 0
        given = {"init": ["--model", str(tiny / "llama")], "analyze spectrum": ["--adapter", str(tmp_path / "run" / "adapter")],
                 "analyze quant-error": ["--model", str(tiny / "llama")]}[command]
        code = main([*command.split(), *given, "--out", str(out), "--device", bad])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--device" in err[-1] and err[-1].startswith("pissa: error:") and not out.exists()


# --- full fine-tuning and training health ------------------------------------------------------------


def test_full_fine_tuning_trains_every_weight_saves_the_model_and_resumes_exactly(tiny: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """`--method full`: the same loop with every weight trainable; OUT/model loads with from_pretrained;
    a crash after the step-4 checkpoint resumes to the same weights as an uninterrupted run."""
    from transformers import AutoModelForCausalLM

    args = ("--method", "full", "--lr", "1e-3")
    assert finetune(tiny, tmp_path / "whole", *args, "--save-every", "0") == 0
    real_step = crash_at_step(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(tiny, tmp_path / "split", *args, "--save-every", "4")
    assert (tmp_path / "split.partial" / "checkpoint" / WEIGHTS).is_file()
    monkeypatch.setattr("pissa.training.loop.train_step", real_step)
    assert finetune(tiny, tmp_path / "split", *args, "--save-every", "4", "--resume") == 0
    base = AutoModelForCausalLM.from_pretrained(tiny / "llama").state_dict()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model").state_dict()
    split = AutoModelForCausalLM.from_pretrained(tmp_path / "split" / "model").state_dict()
    assert whole.keys() == base.keys() and not (tmp_path / "whole" / "adapter").exists()
    assert all(not torch.equal(whole[k], base[k]) for k in whole if k.endswith("proj.weight"))  # every weight moved
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) <= 1e-6
    m = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert m["method"] == "full" and m["trainable_params"] == sum(t.numel() for t in base.values())
    assert m["start_check"] is None and m["eval_after"]["loss"] < m["eval_before"]["loss"]
    with pytest.raises(pissa.PissaError, match="trains every weight and makes no adapter"):
        pissa.attach(AutoModelForCausalLM.from_pretrained(tiny / "llama"), pissa.AdapterConfig(method="full"))


def test_compare_runs_pissa_lora_and_full_side_by_side(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """The three start at the base model, so it is evaluated once before training (then once per method after)."""
    from pissa.cli import main

    calls: list[str] = []
    evaluate = Session.evaluate
    monkeypatch.setattr(Session, "evaluate", lambda self: calls.append(self.cfg.method) or evaluate(self))
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "pissa,lora,full", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"),
                 "--rank", "4", "--steps", "3", "--batch-size", "4", "--eval-size", "8", "--threads", "1",
                 "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert all(f"| {m} |" in report for m in ("pissa", "lora", "full"))
    assert (out / "full" / "model" / "config.json").is_file() and (out / "pissa" / "adapter").is_dir()
    assert calls == ["pissa", "pissa", "lora", "full"]
    before = [json.loads((out / m / "metrics.json").read_text())["eval_before"] for m in ("pissa", "lora", "full")]
    assert before[0] == before[1] == before[2]


def test_only_float32_exact_starts_share_the_base_evaluation() -> None:
    cfg = RunConfig(adapter=AdapterConfig(method="pissa", rank=4))
    assert starts_at_base(cfg)
    assert not starts_at_base(dataclasses.replace(cfg, dtype="bfloat16"))
    assert not starts_at_base(dataclasses.replace(cfg, adapter=AdapterConfig(method="lora-sb", rank=4)))
    assert not starts_at_base(dataclasses.replace(cfg, adapter=AdapterConfig(rank=4, quantize="nf4")))


def test_pissa_and_lora_runs_manage_memory_alike_and_one_process_keeps_the_moving_threshold(
        tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """The peak-memory comparison of PiSSA with LoRA is fair: both runs give memory back at the same points
    (:func:`~pissa.runtime.memory.trim_heap` in attach, as many times), and a single-process run leaves glibc's
    mmap threshold moving (:func:`~pissa.runtime.memory.return_freed_blocks` is for FSDP ranks: fixed, a step on
    one process took ~30% longer)."""
    from pissa.runtime import memory

    calls: dict[str, list[str]] = {}
    for method in ("pissa", "lora"):
        seen = calls[method] = []
        for name in ("return_freed_blocks", "trim_heap"):
            monkeypatch.setattr(memory, name, lambda *a, name=name, seen=seen: seen.append(name) or True)
        monkeypatch.setattr("pissa.adapter.attach.trim_heap", memory.trim_heap)
        monkeypatch.setattr("pissa.training.loop.trim_heap", memory.trim_heap)
        assert finetune(tiny, tmp_path / method, "--steps", "2", "--method", method) == 0
    assert calls["pissa"] == calls["lora"] and "trim_heap" in calls["pissa"]
    assert "return_freed_blocks" not in calls["pissa"]


def test_every_step_logs_its_gradient_norm_and_the_start_check(tiny: Path, tmp_path: Path, capsys) -> None:
    assert finetune(tiny, tmp_path / "run", "--steps", "3") == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [s for s, _ in m["grad_norm"]] == [1, 2, 3] and all(n > 0 for _, n in m["grad_norm"])
    check = m["start_check"]
    assert check["relative_change"] <= START_TOLERANCE["float32"]
    assert check["base_loss"] == pytest.approx(check["adapted_loss"], rel=1e-4)
    assert "start check: first batch loss" in capsys.readouterr().out


def test_an_inexact_init_stops_before_training_with_one_line(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A residual that is not W - s B0 A0 (simulated: the residual left as W) moves the start; the run refuses."""

    monkeypatch.setattr("pissa.adapter.shapes.lowrank.residual_of", lambda W, *a, **kw: W)
    assert finetune(tiny, tmp_path / "bad", "--method", "pissa") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pissa: error: inexact init: attaching pissa moved the first batch's loss")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_a_learning_rate_far_above_the_measured_default_warns(tiny: Path, tmp_path: Path, capsys) -> None:
    default = pissa.METHODS["pissa"].default_lr
    assert finetune(tiny, tmp_path / "hot", "--steps", "1", "--lr", str(default * 40)) == 0
    assert "is 40x pissa's measured default" in capsys.readouterr().err
    assert finetune(tiny, tmp_path / "ok", "--steps", "1", "--lr", str(default * 2)) == 0
    assert "measured default" not in capsys.readouterr().err


# --- sequence packing --------------------------------------------------------------------------------


def test_packed_rows_compute_the_unpacked_loss(tiny: Path) -> None:
    """First-fit packing places every example once within the length; positions restart and the block
    mask keeps examples apart, so the summed loss and the targets equal those of padded rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pissa.data.batches import collate, collate_packed, pack
    from pissa.data.encoding import encode_all
    from pissa.data.loss import loss_sum

    model, tok = AutoModelForCausalLM.from_pretrained(tiny / "llama"), AutoTokenizer.from_pretrained(tiny / "llama")
    data = load_data(str(tiny / "free.jsonl"))
    items = encode_all(tok, data.train[:12], None, "causal-lm", 120)
    rows = pack(items, 120)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in items)
    assert all(sum(len(e.ids) for e in row) <= 120 for row in rows) and len(rows) < len(items)
    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        packed = collate_packed(items, tok.pad_token_id, 120, torch.float32)
        padded = collate(items, tok.pad_token_id, "causal-lm")
        assert packed.targets == padded.targets and packed.tokens == padded.tokens
        assert packed.input_ids.numel() < padded.input_ids.numel()
        with torch.no_grad():
            assert loss_sum(model, packed, "causal-lm").item() == pytest.approx(loss_sum(model, padded, "causal-lm").item(),
                                                                              rel=1e-5)


def test_pack_trains_the_same_run_with_fewer_rows(tiny: Path, tmp_path: Path, capsys) -> None:
    free = ("--data", str(tiny / "free.jsonl"), "--max-length", "128", "--steps", "4")  # ~45-token examples: 2 a row
    assert finetune(tiny, tmp_path / "padded", *free) == 0
    assert finetune(tiny, tmp_path / "packed", *free, "--pack") == 0
    a, b = adapter_tensors(tmp_path / "padded"), adapter_tensors(tmp_path / "packed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    ma, mb = (json.loads((tmp_path / p / "metrics.json").read_text()) for p in ("padded", "packed"))
    assert [x for _, x in ma["train_loss"]] == pytest.approx([x for _, x in mb["train_loss"]], rel=1e-5)
    assert finetune(tiny, tmp_path / "cls", "--model", str(tiny / "bert"), "--pack") == 2
    assert "--pack joins examples of a causal LM" in capsys.readouterr().err and not (tmp_path / "cls").exists()


def test_the_start_check_reports_a_method_that_starts_elsewhere_by_design(caplog) -> None:
    """LoRA-SB (exact_start=False) and a 4-bit residual report their distance; exact methods stop."""
    from pissa.adapter.config import AdapterConfig
    from pissa.training.config import RunConfig

    for adapter in (AdapterConfig(method="lora-sb", calibration="stats.safetensors"), AdapterConfig(quantize="nf4")):
        caplog.clear()
        with caplog.at_level("INFO", logger="pissa"):
            check = start_check(RunConfig(adapter=adapter), 2.0, 1.5)
        assert check["relative_change"] == pytest.approx(0.25)
        assert "starts off the base by design" in caplog.text
    with pytest.raises(pissa.PissaError, match="inexact init"):
        start_check(RunConfig(), 2.0, 1.5)
