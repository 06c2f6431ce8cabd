"""The Flower apps in process (InProcessGrid hands each message to the ClientApp's train function, no Ray): the
strategy's real aggregation path keeps (B'A')_new = (sum p_k B_k) A_old and A A^T = I, a run killed after round 2
resumes to the uninterrupted result, and bad input is a one-line error with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pissa.cli import main
from pissa.methods.federated import client_weights
from pissa.training import flower
from pissa.training.federate import FederateConfig
from pissa.training.federate_out import History
from pissa.training.flower import FederatedStrategy, InProcessGrid, federate


def config(tiny: Path, **kw) -> FederateConfig:
    base = dict(model=str(tiny / "llama"), data=str(tiny / "data.jsonl"), eval_size=16, batch_size=4, lr=1e-2,
                threads=1, clients=2, rounds=3, local_steps=2, algorithms=["fedsvd", "fedavg-lora"])
    base.update(kw)
    return FederateConfig(**base)


def test_server_steps_keep_the_averaged_product_with_orthonormal_a(tiny: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, float]] = []
    real = FederatedStrategy.aggregate_train

    def checked(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = real(self, server_round, replies)
        new = arrays.to_torch_state_dict()
        contents = [m.content for m in replies]
        p = client_weights([int(c["metrics"]["num-examples"]) for c in contents])
        product = ortho = 0.0
        for key in (k for k in new if k.endswith("lora_B")):
            a_key = key.replace("lora_B", "lora_A")
            mean_B = sum(w * c["arrays"].to_torch_state_dict()[key].double() for w, c in zip(p, contents))
            expected = mean_B @ self.current[a_key].double()
            A = new[a_key].double()
            product = max(product, float((new[key].double() @ A - expected).abs().max()))
            ortho = max(ortho, float((A @ A.T - torch.eye(A.shape[0], dtype=torch.float64)).abs().max()))
        seen.append((product, ortho))
        return arrays, metrics

    monkeypatch.setattr(FederatedStrategy, "aggregate_train", checked)
    cfg = config(tiny, algorithms=["fedsvd"], noise_multiplier=1.0, delta=1e-5)
    federate(cfg, tmp_path / "run", grid=InProcessGrid(cfg.clients))
    assert len(seen) == cfg.rounds
    assert all(product < 1e-6 and ortho < 1e-6 for product, ortho in seen), seen
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "accuracy.png").is_file()


def test_a_run_killed_after_round_2_resumes_to_the_uninterrupted_result(tiny: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tiny)
    federate(cfg, tmp_path / "whole", grid=InProcessGrid(cfg.clients))
    real, saves = flower.save_round, [0]

    def save_then_die(folder: Path, factors, history: History) -> None:
        real(folder, factors, history)
        saves[0] += 1
        if history.algorithm == "fedavg-lora" and history.done == 2:
            raise SystemExit("killed")  # as kill -9 right after the checkpoint of round 2

    monkeypatch.setattr(flower, "save_round", save_then_die)
    with pytest.raises(SystemExit):
        federate(cfg, tmp_path / "cut", grid=InProcessGrid(cfg.clients))
    partial = tmp_path / "cut.partial"
    assert (partial / "fedsvd" / "metrics.json").is_file() and (partial / "fedavg-lora" / "checkpoint").is_dir()
    monkeypatch.setattr(flower, "save_round", real)
    federate(cfg, tmp_path / "cut", resume=True, grid=InProcessGrid(cfg.clients))
    assert not partial.exists()
    for algorithm in cfg.algorithms:
        a = load_file(str(tmp_path / "whole" / algorithm / "adapter" / "adapter.safetensors"))
        b = load_file(str(tmp_path / "cut" / algorithm / "adapter" / "adapter.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), algorithm
    assert (tmp_path / "whole" / "report.md").read_text().split("| time")[0] == \
        (tmp_path / "cut" / "report.md").read_text().split("| time")[0]


@pytest.mark.parametrize("extra, message", [
    (["--clients", "500"], "--clients 500 must be between 1 and the"),
    (["--target-epsilon", "3"], "needs its --delta"),
    (["--algorithms", "fedsvd,fedprox"], "--algorithms takes distinct names"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "run"
    code = main(["federate", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--threads", "1",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("pissa: error:")
    assert not out.exists() and not (tmp_path / "run.partial").exists()
