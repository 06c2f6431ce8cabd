"""Projected optimizers for full fine-tuning: torch's AdamW, pissa's GaLore and DCT-AdamW, galore-torch's
GaLoreAdamW and the DCT-AdamW of ista-daslab-optimizers (a transcription, see below), side by side in one run on the
embedded task (SmolLM2-135M-Instruct, Rotten Tomatoes, ``--method full``).

Every optimizer trains the same model with the same loop (``pissa.training.loop.train``), batches, steps and
schedule; the projected ones project the same weights (:func:`pissa.optim.projected_weights`: the 2-D ``nn.Linear``
weights of the blocks, smaller side over r) at the same r and interval T, and train the rest (the tied embedding,
the norms) with AdamW. Each one's learning rate is chosen on a validation split carved from the training data
(:func:`_validation.bracketed_sweep`), then it runs once more and is scored on the test split. Measured: the bytes
of the optimizer state (every tensor in it, galore-torch's projector matrices included), the mean time of a
whole step and of ``optimizer.step()`` alone, the test loss after the steps; ratios against AdamW and against the
DCT-AdamW anchor.

The anchor: ista-daslab-optimizers (1.1.15) cannot run here (its import needs triton, its CUDA extension and
wandb), so :class:`IstaDCTAdamW` below is a transcription of its published update rule (``DCTAdamW`` with
``FFTLowRankProjector``, ``proj="dct"``, ``sim_type="matmul"``, ``ell_norm=1``, no error feedback, no subspace
rotation, one process). Where it departs from the package: it builds one DCT matrix per size (the package builds
one from the first parameter it meets and then fails on a weight of another size: SmolLM2's k_proj / v_proj are
(192, 576)), and the tied embedding goes to its AdamW branch through the same split as the others (the package's
own rule, any side >= 32000, picks the same weights here).

    OMP_NUM_THREADS=1 python benchmarks/optimizers.py --update-results   # about 22 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from galore_torch import GaLoreAdamW
from torch import Tensor, nn

from _results import Results, add_results_options
from _validation import bracketed_sweep
from pissa.adapter.config import AdapterConfig
from pissa.optim import OptimizerConfig, dct_basis, projected_weights, state_bytes
from pissa.training.checkpoint import Progress
from pissa.training.config import RunConfig
from pissa.training.loop import make_optimizer, train
from pissa.training.session import prepare

ANCHOR = "DCT-AdamW (ista-daslab, transcribed)"


class IstaDCTAdamW(torch.optim.Optimizer):
    """ista-daslab-optimizers' DCTAdamW update rule, transcribed (module docstring; not pissa's implementation).

    One step counter t for the whole optimizer; every parameter first decays ``p *= 1 - lr wd``. A parameter of a
    group without ``low_rank`` takes their AdamW: ``p -= lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps sqrt(bc2))``. A
    low-rank one, ``p`` (n, m): with ``Q`` their ``dct3_matrix`` of size ``min(n, m)`` (the orthonormal DCT-II
    matrix, basis vectors as rows: pissa's :func:`~pissa.optim.dct_basis` transposed), the gradient ``A`` is
    ``S = A Q`` (n >= m, columns ranked) or ``S = Q^T A`` (rows ranked); at t = 1 and every t divisible by T the
    r largest l1 norms pick the indices (``topk``, unsorted, int32) and the moments stay where they are (not
    re-indexed); the projected ``a`` updates ``m, v`` (n, r) or (r, m), and ``u = m / (eps sqrt(bc2) + sqrt(v))``
    is mapped back by ``Q[:, idx]^T`` (right) or ``Q[:, idx]`` (left) with the same step size.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, rank: int, every: int,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(groups, dict(lr=lr, weight_decay=0.0, low_rank=False))
        self.rank, self.every, self.betas, self.eps, self.steps = rank, every, betas, eps, 0
        self.bases: dict[int, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self.steps += 1
        (b1, b2), t = self.betas, self.steps
        bc1, sqrt_bc2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        reselect = t == 1 or t % self.every == 0
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd > 0:
                    p.mul_(1 - lr * wd)
                state, g = self.state[p], p.grad
                if not group["low_rank"]:
                    if not state:
                        state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    state["m"].mul_(b1).add_(g, alpha=1 - b1)
                    state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.add_(state["m"] / (state["v"].sqrt() + self.eps * sqrt_bc2), alpha=-lr * sqrt_bc2 / bc1)
                    continue
                right = p.shape[0] >= p.shape[1]
                size = min(p.shape)
                if size not in self.bases:
                    self.bases[size] = dct_basis(size, p.dtype, p.device).T
                q = self.bases[size]
                if not state:
                    shape = (p.shape[0], self.rank) if right else (self.rank, p.shape[1])
                    state["m"], state["v"] = p.new_zeros(shape), p.new_zeros(shape)
                    state["idx"] = torch.zeros(self.rank, dtype=torch.int32, device=p.device)
                if reselect:
                    s = g @ q if right else q.T @ g
                    state["idx"].copy_(s.norm(p=1, dim=0 if right else 1).topk(self.rank, sorted=False).indices)
                    idx = state["idx"].long()
                    a = s[:, idx] if right else s[idx, :]
                else:
                    idx = state["idx"].long()
                    a = g @ q[:, idx] if right else q[:, idx].T @ g
                state["m"].mul_(b1).add_(a, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(a, a, value=1 - b2)
                u = state["m"] / (self.eps * sqrt_bc2 + state["v"].sqrt())
                p.add_(u @ q[:, idx].T if right else q[:, idx] @ u, alpha=-lr * sqrt_bc2 / bc1)


def split(model: nn.Module, rank: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(projected weights, the other trainable parameters), the same split for every projected optimizer."""
    projected = projected_weights(model, rank)
    ids = {id(p) for p in projected}
    return projected, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


def optimizers(cfg: RunConfig) -> dict[str, Callable[[nn.Module, RunConfig], torch.optim.Optimizer]]:
    """``{name: make(model, cfg)}``, every one at ``cfg.lr``, r = ``cfg.optim.proj_rank``, T = ``proj_every``."""
    o = cfg.optim

    def ours(name: str) -> Callable[[nn.Module, RunConfig], torch.optim.Optimizer]:
        return lambda model, c: make_optimizer(model, dataclasses.replace(c, optim=dataclasses.replace(o, optimizer=name)))

    def galore_torch(model: nn.Module, c: RunConfig) -> torch.optim.Optimizer:
        projected, rest = split(model, o.proj_rank)
        groups = [{"params": rest}, {"params": projected, "rank": o.proj_rank, "update_proj_gap": o.proj_every,
                                     "scale": o.proj_scale, "proj_type": "std"}]
        return GaLoreAdamW(groups, lr=c.learning_rate, eps=1e-8, weight_decay=c.weight_decay, no_deprecation_warning=True)

    def ista(model: nn.Module, c: RunConfig) -> torch.optim.Optimizer:
        projected, rest = split(model, o.proj_rank)
        return IstaDCTAdamW([{"params": rest}, {"params": projected, "low_rank": True}], lr=c.learning_rate,
                            rank=o.proj_rank, every=o.proj_every)

    return {"AdamW (torch)": ours("adamw"), "GaLore (pissa)": ours("galore"), "GaLoreAdamW (galore-torch)": galore_torch,
            "DCT-AdamW (pissa)": ours("dct-adamw"), ANCHOR: ista}


def measure(cfg: RunConfig, make: Callable[[nn.Module, RunConfig], torch.optim.Optimizer], work: Path,
            val_size: int | None) -> dict[str, Any]:
    """Train ``cfg.steps`` steps with ``make``'s optimizer and score the validation (``val_size``) or test split;
    cached in ``work`` (a rerun reads the finished runs back)."""
    record = work / "result.json"
    if record.is_file():
        return json.loads(record.read_text())
    if val_size is not None:
        cfg = dataclasses.replace(cfg, val_size=val_size, eval_size=val_size)
    session = prepare(cfg)
    optimizer = make(session.model, cfg)
    seconds, step = [0.0], optimizer.step

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = step(*args, **kwargs)
        seconds[0] += time.perf_counter() - start
        return out

    optimizer.step = timed  # type: ignore[method-assign]
    progress = Progress()
    work.mkdir(parents=True, exist_ok=True)
    train(session, work, progress, optimizer, show=False)
    after = session.evaluate()
    out = {"loss": after["loss"], "accuracy": after["accuracy"], "state_bytes": state_bytes(optimizer),
           "step_s": progress.train_seconds / cfg.steps, "optimizer_s": seconds[0] / cfg.steps,
           "train_loss": progress.train_loss}
    record.write_text(json.dumps(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--val-size", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--proj-rank", type=int, default=128)
    p.add_argument("--proj-every", type=int, default=6)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--extend", type=int, default=2, help="grid extensions past an edge that holds the best rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="cache of finished runs (default: a temporary folder)")
    add_results_options(p, "optimizers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    opt = OptimizerConfig(proj_rank=args.proj_rank, proj_every=args.proj_every)
    base = RunConfig(adapter=AdapterConfig(method="full"), optim=opt, steps=args.steps, batch_size=args.batch_size,
                     max_length=args.max_length, eval_size=args.eval_size, warmup=2, device="cpu",
                     threads=args.threads, save_every=10**6)
    title = "Projected optimizers (GaLore, DCT-AdamW) against AdamW and their reference implementations"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="optimizers-") as tmp:
        work = args.work or Path(tmp)
        chosen, sweeps, tests = {}, {}, {}
        for i, (name, make) in enumerate(optimizers(base).items()):
            def score(lr: float, val: int | None, i: int = i, make=make) -> dict[str, Any]:
                return measure(dataclasses.replace(base, lr=lr), make, work / f"{i}-{lr:g}-{val}", val)

            sweeps[name], chosen[name] = bracketed_sweep(lambda lr, s=score: s(lr, args.val_size)["loss"], args.lrs,
                                                         3.0, args.extend)
            tests[name] = score(chosen[name], None)
            t = tests[name]
            print(f"{name}: lr {chosen[name]:g}, state {t['state_bytes'] / 2**20:.1f} MiB, step {t['step_s']:.2f} s, "
                  f"test loss {t['loss']:.4f}", flush=True)
        session = prepare(base)
        projected, rest = split(session.model, args.proj_rank)
        n_proj, n_rest = sum(q.numel() for q in projected), sum(q.numel() for q in rest)
        before = session.evaluate()["loss"]
        ref, anchor = tests["AdamW (torch)"], tests[ANCHOR]
        res.add(f"SmolLM2-135M-Instruct fully fine-tuned on Rotten Tomatoes: {args.steps} steps of batch "
                f"{args.batch_size} (max length {args.max_length}), cosine schedule (warm-up 2), float32 on the CPU "
                f"with {args.threads} thread(s), seed 0, weight decay 0; the same batches for every optimizer. "
                f"Projection: r = {args.proj_rank}, T = {args.proj_every} (GaLore's SVD and DCT-AdamW's column "
                f"choice at steps 0 and {args.proj_every}; the transcribed anchor at its steps 1 and multiples of T), "
                f"GaLore's scale {opt.proj_scale}. {len(projected)} weights ({n_proj:,} parameters) are projected; "
                f"{n_rest:,} parameters (the tied embedding, the norms) take AdamW in every row. Test loss before "
                f"training: {before:.4f}.")
        res.heading("Test split, each at the rate chosen on validation")
        res.table(["optimizer", "lr", "state (MiB)", "vs AdamW", "step (s)", "optimizer.step (s)", "step vs AdamW",
                   "test loss", "vs AdamW", "vs anchor", "accuracy"],
                  [[n, f"{chosen[n]:g}", f"{t['state_bytes'] / 2**20:.1f}", f"{t['state_bytes'] / ref['state_bytes']:.3f}",
                    f"{t['step_s']:.2f}", f"{t['optimizer_s']:.2f}", f"{t['step_s'] / ref['step_s']:.3f}",
                    f"{t['loss']:.4f}", f"{t['loss'] / ref['loss']:.3f}", f"{t['loss'] / anchor['loss']:.3f}",
                    f"{t['accuracy']:.3f}"] for n, t in tests.items()])
        res.add(f"State of AdamW's part alone (the {n_rest:,} unprojected parameters, two float32 moments each): "
                f"{8 * n_rest / 2**20:.1f} MiB in every row; a whole AdamW state would be {8 * (n_proj + n_rest) / 2**20:.1f}"
                f" MiB. Step times are means over the steps of the test run (forward, backward, clipping, step).")
        res.heading("Training loss at the same steps (test runs)")
        names = list(tests)
        steps = [s for s, _ in ref["train_loss"]]
        curves = {n: dict(map(tuple, tests[n]["train_loss"])) for n in names}
        res.table(["step", *names], [[s, *(f"{curves[n][s]:.4f}" for n in names)] for s in steps])
        res.heading("Learning-rate sweep (validation loss after training; chosen rate in bold)")
        res.add(f"Validation: {args.val_size} reviews carved from the training data; the grid grows by a factor 3 past "
                f"an edge that holds the best rate (at most {args.extend} time(s)).")
        lrs = sorted({lr for sw in sweeps.values() for lr in sw})
        res.table(["optimizer", *(f"lr {lr:g}" for lr in lrs)],
                  [[n, *((f"**{sw[lr]:.4f}**" if lr == chosen[n] else f"{sw[lr]:.4f}") if lr in sw else "" for lr in lrs)]
                   for n, sw in sweeps.items()])


if __name__ == "__main__":
    main()
