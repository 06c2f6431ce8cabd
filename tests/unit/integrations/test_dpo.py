"""TRL's DPOTrainer on a pissa model with ref_model=None (pissa.integrations.dpo): its reference log-probabilities
are the base model's, with no second copy of the model; PEFT's disabled-adapter reference would be W_res's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pissa
from pissa.runtime.hub import load_model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def preference_rows(tiny: Path, n: int = 16) -> list[dict[str, str]]:
    """The right label chosen, the wrong one rejected."""
    rows = [json.loads(line) for line in (tiny / "data.jsonl").read_text().splitlines()[:n]]
    other = {"positive": "negative", "negative": "positive"}
    return [{"prompt": f"Q: {r['text']}\nA:", "chosen": f" {r['label']}", "rejected": f" {other[r['label']]}"}
            for r in rows]


def dpo_trainer(tiny: Path, out: Path, model, ref_model=None, **extra):
    from datasets import Dataset
    from trl import DPOConfig

    from pissa.integrations.dpo import PissaDPOTrainer

    _, tok = load_model(str(tiny / "llama"))
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                     report_to=[], use_cpu=True, disable_tqdm=True, bf16=False, activation_checkpointing=False, seed=0,
                     max_length=32, save_strategy="no", **extra)
    return PissaDPOTrainer(model=model, ref_model=ref_model, args=args,
                           train_dataset=Dataset.from_list(preference_rows(tiny)), processing_class=tok)


def ref_logps(trainer, model) -> torch.Tensor:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return torch.cat(trainer.compute_ref_log_probs(model, batch))


def test_dpo_reference_log_probs_are_the_base_models_without_a_copy(tiny: Path, tmp_path: Path) -> None:
    model, _ = load_model(str(tiny / "llama"))
    pissa.attach(model, pissa.AdapterConfig(method="pissa", rank=4))
    trainer = dpo_trainer(tiny, tmp_path / "run", model, max_steps=3)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: the policy is its reference
    assert not any(p.data_ptr() in {q.data_ptr() for q in model.parameters()} for p in trainer.ref_model.parameters())
    assert list(trainer.ref_model.parameters()) == []  # the reference holds no tensor of its own
    base, _ = load_model(str(tiny / "llama"))
    explicit = dpo_trainer(tiny, tmp_path / "explicit", model, ref_model=base, max_steps=1)
    ours, theirs = ref_logps(trainer, trainer.ref_model), ref_logps(explicit, explicit.ref_model)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # the policy moved: its own log-probs are not the reference's
    assert not torch.allclose(ref_logps(trainer, model), theirs, atol=1e-3)
    # PEFT's reference (the adapter disabled) is the residual model W_res, not the base: the trap pissa avoids
    residual, _ = load_model(str(tiny / "llama"))
    for name, layer in pissa.adapted_layers(model):
        residual.get_submodule(name).weight.data.copy_(layer.residual.weight)
    trap = dpo_trainer(tiny, tmp_path / "trap", model, ref_model=residual, max_steps=1)
    assert not torch.allclose(ref_logps(trap, trap.ref_model), theirs, atol=1e-2)


def test_a_model_without_adapters_is_refused(tiny: Path, tmp_path: Path) -> None:
    model, _ = load_model(str(tiny / "llama"))
    with pytest.raises(pissa.PissaError, match="no pissa adapters"):
        dpo_trainer(tiny, tmp_path / "run", model, max_steps=1)
