"""Helpers of the tests: tiny random models of every supported layer kind, fixed inputs, the tiny model folder's
contents and a whole-command runner. Fixtures live in conftest.py."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import pissa
from pissa.cli import main
from pissa.methods.registry import ADAPTERS, METHODS
from pissa.training import loop

WEIGHT_ONLY = sorted(m for m in ADAPTERS if METHODS[m].needs == ("weight",))
"""The adapter methods that read the weight alone (data-aware ones are tested with statistics in test_data_aware.py)."""

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])
"""The devices present: device-agnostic tests run on each (CPU always), unchanged on a GPU machine."""


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small MLP with Linear layers of three shapes."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 12)).to(dtype)


def tiny_gpt2() -> nn.Module:
    """A randomly initialized 2-layer GPT-2 (Conv1D projections, tied lm_head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialized 2-layer Llama (Linear projections, untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def train_steps(model: nn.Module, batches: list, loss_fn, steps: int = 5, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on the trainable parameters; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        loss = loss_fn(model, batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


TOKENS = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
"""A fixed batch of token ids for the tiny language models (vocabulary 96)."""


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of ``ids`` predicting themselves."""
    return model(input_ids=ids, labels=ids).loss


def logits(model: nn.Module) -> torch.Tensor:
    """The model's logits on :data:`TOKENS`, without autograd."""
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def decaying(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """A random m x n matrix with singular values decay^i (a trained-weight-like spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    S = decay ** torch.arange(k, dtype=torch.float64)
    return (U * S) @ V.T


# --- a tiny model folder with data, for whole runs of the command line -------------------------------


POS = ["great", "good", "fun", "moving", "brilliant", "lovely"]
NEG = ["bad", "dull", "boring", "awful", "tedious", "weak"]
FILL = ["the", "movie", "film", "plot", "actors", "story", "was", "is", "and", "a", "of"]

def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic reviews: filler words plus one word that decides the label."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = r.choice(["positive", "negative"])
        words = [r.choice(FILL) for _ in range(r.randint(2, 6))] + [r.choice(POS if label == "positive" else NEG)]
        r.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return rows


def tokenizer_for(texts: list[str]):
    """A 300-token byte-level BPE trained on ``texts`` (offline, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_folder(root: Path) -> Path:
    """Write into ``root``: ``llama/`` (tiny random LlamaForCausalLM + tokenizer), ``bert/`` (tiny BERT),
    ``data.jsonl`` (text,label) and ``free.jsonl`` (prompt,completion); returns ``root``."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    rows = sentiment_rows(160)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    free = [{"prompt": f"Q: {r['text']}\nA:", "completion": f" {r['label']} review"} for r in rows[:60]]
    (root / "free.jsonl").write_text("".join(json.dumps(r) + "\n" for r in free))
    tok = tokenizer_for([f"Text: {r['text']}\nLabel: {r['label']}" for r in rows])
    torch.manual_seed(3)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    bert.config.architectures = ["BertModel"]
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root


def finetune(tiny: Path, out: Path, *extra: str) -> int:
    args = ["finetune", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--rank", "4",
            "--lr", "1e-2", "--steps", "8", "--batch-size", "4", "--eval-size", "16", "--warmup", "2",
            "--threads", "1", "--out", str(out), *extra]
    return main(args)


def token_batches(seed: int = 0, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Token batches of a 96-token vocabulary with right padding (lengths 10, 7, 4 in each batch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 10), generator=g)
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 7:] = 0
        mask[2, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def attach_train_reload(base: torch.nn.Module, cfg: pissa.AdapterConfig, folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Attach ``cfg`` to a copy of ``base`` (checking where it starts), train 3 steps, save and load the
    adapter onto another copy (checking the logits); returns (trained model, reloaded model)."""
    before = logits(base)
    model = pissa.attach(copy.deepcopy(base), cfg)
    start = relative_error(logits(model), before)
    assert start <= 1e-5 if METHODS[cfg.method].exact_start else start > 1e-7
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    pissa.save_adapter(model, folder)
    loaded = pissa.load_adapter(copy.deepcopy(base), folder)
    assert relative_error(logits(loaded), logits(model)) <= 1e-6
    return model, loaded


def torchrun(script: str, tmp_path: Path, *args: str, nproc: int = 2) -> None:
    """Run ``script`` under ``torchrun --standalone --nproc_per_node nproc`` with the tests folder importable."""
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(script))
    path_ = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path_}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(path), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def fsdp_steps(model, rows: slice, steps: int = 3) -> None:
    """AdamW steps on ``rows`` of a fixed (4, 10) batch (no padding: every row has 9 targets)."""
    ids = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(0))[rows]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


IDS = torch.arange(24).reshape(2, 12) % 100


def interrupt_after(monkeypatch, steps: int) -> None:
    """Make training steps after the first ``steps`` raise KeyboardInterrupt (a Ctrl-C between steps)."""
    real, calls = loop.train_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] > steps:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)


def pissa_accuracy(model, tokenizer, n: int, max_length: int) -> float:
    """pissa's likelihood accuracy (the label of largest log-likelihood, :func:`pissa.training.evaluation.evaluate`)
    on the first ``n`` rotten_tomatoes test examples."""
    from pissa.data.datasets import load_data
    from pissa.data.encoding import encode_all
    from pissa.training.evaluation import evaluate

    data = load_data("rotten_tomatoes")
    assert data.labels is not None
    items = encode_all(tokenizer, data.test[:n], data.labels, "causal-lm", max_length)
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in data.labels]
    return evaluate(model, items, data.labels, label_ids, "causal-lm", tokenizer.pad_token_id)["accuracy"]
