"""A pissa-attached model in transformers' Trainer and TRL's SFTTrainer (pissa.integrations):
checkpoints and ``save_model`` hold the adapter and no model weights, they load with
``pissa.load_adapter``, resuming from a checkpoint ends with the uninterrupted run's adapter,
``load_best_model_at_end`` works, merge gives the model its own ``save_pretrained`` back."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

import pissa
from helpers import logits, mlp, tiny_llama
from pissa.integrations.trainer import ADAPTER_DIR, INDEX_FILE

MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "config.json")
"""What a checkpoint of the whole model holds, and an adapter checkpoint must not."""


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test (the trainers keep torch's default, a thread per core, which on a CPU
    loaded by other jobs slowed the SmolLM2 test down 4x; benchmarks/results/trainer_step_time.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def assert_adapter_only(folder: Path, model: nn.Module) -> None:
    """``folder`` holds the adapter and an index of exactly the trainable tensors, and no model weights."""
    assert (folder / ADAPTER_DIR / "adapter.safetensors").is_file() and (folder / ADAPTER_DIR / "adapter_config.json").is_file()
    assert not any((folder / name).exists() for name in MODEL_FILES), sorted(p.name for p in folder.iterdir())
    index = json.loads((folder / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(trained(model))


# --- transformers.Trainer on the tiny Llama --------------------------------------------------------


ROWS = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(0))]


class StopAt(TrainerCallback):
    """Ends training after ``step`` (the checkpoint of that step is still written): an interruption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train_tiny(out: Path, *, stop_at: int | None = None, resume: Path | None = None, **extra) -> tuple[nn.Module, object]:
    """A fresh PiSSA rank-4 tiny Llama trained 6 steps by transformers.Trainer, a checkpoint every 3 steps."""
    from transformers import Trainer, TrainingArguments

    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4))
    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=ROWS, eval_dataset=ROWS[:4],
                      callbacks=[StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


def test_trainer_checkpoints_hold_only_the_adapter_which_loads_onto_a_fresh_base(tmp_path: Path) -> None:
    model, _ = train_tiny(tmp_path)
    for step in (3, 6):
        assert_adapter_only(tmp_path / f"checkpoint-{step}", model)
    loaded = pissa.load_adapter(tiny_llama(), tmp_path / "checkpoint-6" / ADAPTER_DIR)
    assert torch.equal(logits(loaded), logits(model))


def test_resuming_from_a_trainer_checkpoint_ends_with_the_uninterrupted_adapter(tmp_path: Path, caplog) -> None:
    full, _ = train_tiny(tmp_path / "full")
    stopped, _ = train_tiny(tmp_path / "run", stop_at=3)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    hf_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    hf_logger.addHandler(caplog.handler)
    try:
        resumed, trainer = train_tiny(tmp_path / "run", resume=tmp_path / "run" / "checkpoint-3")
    finally:
        hf_logger.removeHandler(caplog.handler)
    assert trainer.state.global_step == 6
    assert "missing keys" not in caplog.text and "unexpected keys" not in caplog.text  # the frozen rest is not saved
    want, got, half = trained(full), trained(resumed), trained(stopped)
    assert all(torch.allclose(got[n], want[n], rtol=0, atol=1e-6) for n in want)
    assert any(not torch.allclose(half[n], want[n], rtol=0, atol=1e-4) for n in want)  # the resumed run did train


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path: Path) -> None:
    model, trainer = train_tiny(tmp_path, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                                metric_for_best_model="loss", greater_is_better=True)  # the worse of the two, on purpose
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-3"
    from safetensors.torch import load_file

    saved = load_file(str(best / ADAPTER_DIR / "adapter.safetensors"))
    assert all(torch.equal(p, saved[n]) for n, p in trained(model).items())


def test_save_model_writes_the_adapter_that_loads_and_exports_to_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    model, trainer = train_tiny(tmp_path / "run", save_strategy="no")
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final", model)
    loaded = pissa.load_adapter(tiny_llama(), tmp_path / "final" / ADAPTER_DIR)
    assert torch.equal(logits(loaded), logits(model))
    pissa.export_peft(loaded, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft"))
    assert torch.allclose(logits(peft_model), logits(model), atol=1e-4)


# --- the model's save_pretrained ----------------------------------------------------------------------


def test_save_pretrained_of_an_attached_model_writes_the_adapter_and_merge_restores_the_original(tmp_path: Path) -> None:
    model = tiny_llama()
    own_keys = copy.copy(model._keys_to_ignore_on_save)
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    model.save_pretrained(tmp_path / "adapted")
    assert_adapter_only(tmp_path / "adapted", model)
    assert torch.equal(logits(pissa.load_adapter(tiny_llama(), tmp_path / "adapted" / ADAPTER_DIR)), logits(model))
    pissa.merge(model)
    assert "save_pretrained" not in vars(model) and model._keys_to_ignore_on_save == own_keys
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_save_pretrained_refuses_what_an_adapter_cannot_do_in_one_line(tmp_path: Path) -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4))
    for kwargs, words in [({"push_to_hub": True}, "push_to_hub"), ({"state_dict": model.state_dict()}, "state_dict")]:
        with pytest.raises(pissa.PissaError, match=words) as err:
            model.save_pretrained(tmp_path / "x", **kwargs)
        assert "\n" not in str(err.value)
    model.save_pretrained(tmp_path / "y", is_main_process=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_models_without_save_pretrained_are_left_alone() -> None:
    model = pissa.attach(mlp(), pissa.AdapterConfig(rank=4))
    assert "save_pretrained" not in vars(model) and not hasattr(model, "_keys_to_ignore_on_save")


# --- TRL's SFTTrainer ---------------------------------------------------------------------------------


def sft_config(out: Path, **extra):
    """SFTConfig for a CPU test: float32, no activation checkpointing (SFTConfig turns both on by default)."""
    from trl import SFTConfig

    defaults = dict(per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                    disable_tqdm=True, bf16=False, activation_checkpointing=False, seed=0)
    return SFTConfig(output_dir=str(out), **{**defaults, **extra})


def test_sft_trainer_on_prompt_completion_rows_writes_adapter_checkpoints(tiny: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    from pissa.runtime.hub import load_model

    model, tok = load_model(str(tiny / "llama"))
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    rows = [json.loads(line) for line in (tiny / "free.jsonl").read_text().splitlines()]
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path / "run", max_steps=4, save_steps=2, max_length=32),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    assert_adapter_only(tmp_path / "run" / "checkpoint-4", model)
    base, _ = load_model(str(tiny / "llama"))
    loaded = pissa.load_adapter(base, tmp_path / "run" / "checkpoint-4" / ADAPTER_DIR)
    ids = torch.tensor([tok("Q: the movie was great\nA:")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --- SmolLM2 in TRL's SFTTrainer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[nn.Module, object]:
    """The embedded SmolLM2-135M-Instruct and its tokenizer, never adapted (tests adapt deep copies)."""
    from pissa.runtime.hub import load_model

    return load_model("smollm2")


def chat_rows(n: int) -> list[dict]:
    """Conversational prompt-completion rows from the embedded arithmetic task (TRL learns the completion only)."""
    from pissa.data.tasks import arithmetic_rows

    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in arithmetic_rows(n)]


def train_smollm2(smollm2, out: Path, *, stop_at: int | None = None, resume: Path | None = None):
    from datasets import Dataset
    from trl import SFTTrainer

    base, tok = smollm2
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=8, targets=["q_proj", "v_proj"]))
    args = sft_config(out, max_steps=4, save_steps=2, per_device_train_batch_size=2, max_length=64, learning_rate=2e-4)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chat_rows(16)), processing_class=tok,
                         callbacks=[StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


@pytest.mark.slow
def test_smollm2_sft_checkpoints_resume_and_final_adapter_exports(smollm2, tmp_path: Path) -> None:
    from peft import PeftModel

    base, tok = smollm2
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Mia has 3 shells."}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=True)["input_ids"]])

    def out(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    full, _ = train_smollm2(smollm2, tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-4"
    assert_adapter_only(ckpt, full)
    assert folder_mb(ckpt) < 20 and folder_mb(ckpt / ADAPTER_DIR) < 5  # the model alone is 538 MB
    assert torch.equal(out(pissa.load_adapter(copy.deepcopy(base), ckpt / ADAPTER_DIR)), out(full))

    stopped, _ = train_smollm2(smollm2, tmp_path / "run", stop_at=2)
    resumed, trainer = train_smollm2(smollm2, tmp_path / "run", resume=tmp_path / "run" / "checkpoint-2")
    want, got, half = trained(full), trained(resumed), trained(stopped)
    assert all(torch.allclose(got[n], want[n], rtol=0, atol=1e-6) for n in want)
    assert any(not torch.allclose(half[n], want[n], rtol=0, atol=1e-5) for n in want)

    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final", resumed)
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "final" / ADAPTER_DIR)
    assert torch.equal(out(loaded), out(resumed))
    pissa.export_peft(loaded, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert torch.allclose(out(peft_model), out(resumed), atol=1e-3)
