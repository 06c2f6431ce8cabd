"""``pissa federate`` on Flower: a ServerApp whose strategy aggregates as :func:`~pissa.training.federate.server_step`
does, and a ClientApp that runs :func:`~pissa.training.federate.client_round`.

:func:`federate` runs both in one process with Flower's simulation runtime (``flwr.simulation.run_simulation``,
clients in Ray workers). The module objects :data:`server_app` and :data:`client_app` are the same apps for
Flower's deployment runtime (``flwr run`` against a SuperLink with SuperNodes started with
``--node-config "partition-id=K num-partitions=N"``): the ServerApp reads ``config`` (a federate config file,
e.g. the ``config.yaml`` a run wrote) and ``out`` from the run config; see docs/guides/federated.md.

Every message carries the whole configuration (``pissa-config``, JSON), the algorithm and the round; a client
loads the model once per configuration and keeps it between rounds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _name, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_name, _value)  # before Flower (and Ray) start

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pissa import options  # noqa: E402
from pissa.adapter.attach import adapted_layers  # noqa: E402
from pissa.adapter.save_load import save_adapter  # noqa: E402
from pissa.adapter.shapes.lowrank import CORE, FACTOR_B  # noqa: E402
from pissa.errors import PissaError  # noqa: E402
from pissa.files.atomic import atomic_write_text  # noqa: E402
from pissa.training.federate import (  # noqa: E402
    Factors,
    FederateConfig,
    Privacy,
    ServerStep,
    client_round,
    client_shares,
    get_factors,
    privacy_plan,
    server_step,
    set_factors,
)
from pissa.training.federate_out import History, finish, load_round, plot, read_metrics, report, save_round  # noqa: E402
from pissa.training.run import RUN_CONFIG, output_folder, resumed_config, write_config  # noqa: E402
from pissa.training.session import Session, prepare  # noqa: E402

log = logging.getLogger(__name__)

CONFIG_KEY = "pissa-config"


def config_json(cfg: FederateConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> FederateConfig:
    return FederateConfig(**json.loads(text))


# --- the client ---------------------------------------------------------------------------------


@dataclass
class ClientState:
    """A client's loaded model, the data shares and the privacy plan of one configuration."""

    key: str
    cfg: FederateConfig
    session: Session
    shares: list[list[int]]
    plan: list[Privacy] | None


_CLIENT: list[ClientState] = []
"""The configuration this process's client has loaded (one at a time)."""


LOADED_BY = ("model", "data", "kind", "adapter", "device", "dtype", "max_length", "pack", "eval_size", "val_size",
             "eval_data", "seed", "threads")
"""The options a client's loaded model and encoded data depend on (the others are read each round)."""


def client_state(text: str) -> ClientState:
    """The client of configuration ``text``: its model is loaded at the first message and kept while the options
    of :data:`LOADED_BY` stay the same (the next rounds, the next algorithm, another learning rate)."""
    if _CLIENT and _CLIENT[0].key == text:
        return _CLIENT[0]
    cfg = config_from_json(text)
    loaded = {name: getattr(cfg.run_config(), name) for name in LOADED_BY}
    if _CLIENT and {name: getattr(_CLIENT[0].cfg.run_config(), name) for name in LOADED_BY} == loaded:
        session = _CLIENT[0].session
        session.cfg = cfg.run_config()
    else:
        session = prepare(cfg.run_config())
    shares = client_shares(session, cfg)
    _CLIENT[:] = [ClientState(text, cfg, session, shares, privacy_plan(cfg, [len(s) for s in shares]))]
    return _CLIENT[0]


def train_message(msg: Message, context: Context) -> Message:
    """A ClientApp's train: the global factors in, this client's factors, examples and loss out."""
    config: Any = msg.content.config_records["config"]
    state = client_state(str(config[CONFIG_KEY]))
    k = int(context.node_config["partition-id"])
    parts = int(context.node_config.get("num-partitions", state.cfg.clients))
    if parts != state.cfg.clients or not 0 <= k < parts:
        raise PissaError(f"this node is partition {k} of {parts}, the run has `clients` {state.cfg.clients}")
    factors = msg.content.array_records["arrays"].to_torch_state_dict()
    new, loss = client_round(state.session, state.cfg, str(config["algorithm"]), factors, state.shares[k],
                             int(config["round"]), k, state.plan[k] if state.plan else None)
    metrics = MetricRecord({"num-examples": len(state.shares[k]), "partition-id": k, "train-loss": loss})
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)


client_app = ClientApp()
client_app.train()(train_message)


# --- the server ---------------------------------------------------------------------------------


class FederatedStrategy(FedAvg):
    """FedAvg's sampling (every client, every round) with pissa's aggregation (:func:`server_step`) and the
    round offset of a resumed run."""

    def __init__(self, cfg: FederateConfig, algorithm: str, start: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.clients,
                         min_available_nodes=cfg.clients)
        self.cfg, self.algorithm, self.offset = cfg, algorithm, start
        self.current: Factors = {}
        self.step: ServerStep | None = None
        self.train_loss = float("nan")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Any:
        self.current = arrays.to_torch_state_dict()
        config = ConfigRecord({CONFIG_KEY: config_json(self.cfg), "algorithm": self.algorithm,
                               "round": self.offset + server_round})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed or len(replies) != self.cfg.clients:
            reason = failed[0].error.reason if failed else f"{len(replies)} of {self.cfg.clients} clients replied"
            raise PissaError(f"round {self.offset + server_round} failed on a client: {reason}")
        contents = sorted((m.content for m in replies), key=lambda c: int(c["metrics"]["partition-id"]))  # fixed order
        counts = [int(c["metrics"]["num-examples"]) for c in contents]
        self.step = server_step(self.algorithm, self.current, [c["arrays"].to_torch_state_dict() for c in contents],
                                counts, self.offset + server_round, self.cfg.refactor_every, self.cfg.refactor_warmup)
        losses = [float(c["metrics"]["train-loss"]) for c in contents]
        self.train_loss = sum(n * v for n, v in zip(counts, losses, strict=True)) / sum(counts)
        return ArrayRecord(self.step.factors), MetricRecord({"train-loss": self.train_loss})


@dataclass
class Server:
    """The server's side of a run: its model (to score the global adapter), the client shares and the folder."""

    cfg: FederateConfig
    session: Session
    counts: list[int]
    plan: list[Privacy] | None
    work: Path
    initial: Factors
    """The start every algorithm shares: the factors attach made (seeded)."""

    def run(self, grid: Grid | InProcessGrid) -> dict[str, History]:
        """Every algorithm of the run (finished ones read back, an interrupted one resumed at its next round)."""
        return {a: self.run_algorithm(grid, a) for a in self.cfg.algorithms}

    def run_algorithm(self, grid: Grid | InProcessGrid, algorithm: str) -> History:
        folder = self.work / algorithm
        if (folder / "metrics.json").is_file():
            return read_metrics(folder)
        started = time.perf_counter()
        saved = load_round(folder)
        if saved is None:
            factors = self.initial
            history = History(algorithm, self.counts, privacy=History.privacy_record(self.plan, self.cfg.delta))
            set_factors(self.session, factors, algorithm)
            history.eval_before = self.session.evaluate()
        else:
            factors, history = saved
        cfg, done = self.cfg, history.done
        strategy = FederatedStrategy(cfg, algorithm, done)
        bar = tqdm(total=cfg.rounds, initial=done, desc=f"{algorithm} rounds", unit="round", dynamic_ncols=True)
        base = history.seconds

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            assert strategy.step is not None
            new = arrays.to_torch_state_dict()
            set_factors(self.session, new, algorithm)
            scores = self.session.evaluate()
            step = strategy.step
            history.rounds.append({"round": done + server_round, **scores, "train_loss": strategy.train_loss,
                                   "refactored": step.refactored, "product_error": step.product_error,
                                   "orthonormality_error": step.orthonormality_error})
            history.seconds = base + time.perf_counter() - started
            save_round(folder, new, history)
            bar.set_postfix(accuracy=f"{scores['accuracy']:.3f}", loss=f"{scores['loss']:.4f}")
            bar.update(1)
            return MetricRecord(dict[str, Any](scores))

        if done < cfg.rounds:
            result = strategy.start(grid=grid,  # type: ignore[arg-type]  # InProcessGrid: what start uses of a Grid
                                    initial_arrays=ArrayRecord(factors), num_rounds=cfg.rounds - done,
                                    evaluate_fn=after_round)
            factors = result.arrays.to_torch_state_dict()
        bar.close()
        if history.done != cfg.rounds:
            raise PissaError(f"{algorithm} stopped after round {history.done} of {cfg.rounds}; continue with `resume`")
        set_factors(self.session, factors, algorithm)
        save_adapter(self.session.model, folder / "adapter")
        finish(folder, cfg, history)
        return history


def start_server(cfg: FederateConfig, work: Path) -> Server:
    """Load the server's model and check the run can go (client count against the data, B A factors,
    the privacy plan); every user error surfaces here, before anything is written."""
    session = prepare(cfg.run_config())
    for name, layer in adapted_layers(session.model):
        if FACTOR_B not in layer.tensor_names or CORE in layer.tensor_names:
            raise PissaError(f"federated averaging needs B A factors; {name} is a {layer.shape.name} adapter: "
                             "use `init` lora or pissa")
    shares = client_shares(session, cfg)
    counts = [len(s) for s in shares]
    return Server(cfg, session, counts, privacy_plan(cfg, counts), work, get_factors(session))


class InProcessGrid:
    """A Flower grid served in this process: nodes 1..K, each message answered by the ClientApp's train function
    as partition ``node - 1``, one client after another. The ServerApp's strategy and the ClientApp's code are
    the same as under the simulation and deployment runtimes, without their worker processes: for tests and for
    benchmarks on one busy machine (each client keeps one model in this process instead of one per worker).
    It sets Flower's task identity (run, node, task 1), which messages made outside a runtime need."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.clients + 1))

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": self.clients},
                              state=RecordDict(), run_config={})
            replies.append(train_message(msg, context))
        return replies


def simulate(server: Server) -> dict[str, History]:
    """Run ``server`` with its clients under Flower's simulation runtime (one Ray worker per core); re-raise
    what stopped the ServerApp."""
    from flwr.simulation import run_simulation

    found: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            found["results"] = server.run(grid)
        except BaseException as exc:  # Flower logs a ServerApp's exception; the command reports it
            found["error"] = exc

    cores = max(1, server.cfg.threads)
    run_simulation(server_app=app, client_app=client_app, num_supernodes=server.cfg.clients,
                   backend_config={"client_resources": {"num_cpus": cores, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cores * min(server.cfg.clients, 2), "include_dashboard": False}})
    if "error" in found:
        raise found["error"]
    if "results" not in found:
        raise PissaError("the Flower simulation stopped before the ServerApp finished; continue with `resume`")
    return found["results"]


def federate(cfg: FederateConfig, out: str | Path | None = None, *, resume: bool = False,
             explicit: dict[str, Any] | None = None, grid: Grid | InProcessGrid | None = None) -> tuple[Path, str]:
    """``pissa federate``: every algorithm of ``cfg`` into ``out/ALGO/`` (default ``runs/federate``) through
    ``out.partial`` (a per-round checkpoint; ``resume`` continues at the next round), then ``out/report.md``
    and ``out/accuracy.png``. ``grid``: the Flower deployment runtime's (None: simulate). Returns (out, report)."""
    folder = Path(out or "runs/federate")
    with output_folder(folder, resume) as work:
        if resume:
            cfg = resumed_config(work / RUN_CONFIG, FederateConfig, explicit or {})
        server = start_server(cfg, work)
        work.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_config(work / RUN_CONFIG, cfg)
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.WARNING)  # Flower logs every round at INFO; the progress bar says it
        try:
            results = server.run(grid) if grid is not None else simulate(server)
        finally:
            flwr_log.setLevel(level)
        text = report(cfg, results)
        plot(cfg, results, work / "accuracy.png")
        atomic_write_text(work / "report.md", text)
    return folder, text


server_app = ServerApp()


@server_app.main()
def deployed(grid: Grid, context: Context) -> None:
    """The ServerApp under ``flwr run``: run config ``config`` (a federate config file), ``out`` and ``resume``."""
    run = context.run_config
    if "config" not in run:
        raise PissaError("the ServerApp needs run config `config` (a pissa federate config file) and `out`")
    cfg = options.build(FederateConfig, options.read_config_file(str(run["config"])))
    assert isinstance(cfg, FederateConfig)
    folder, text = federate(cfg, str(run.get("out", "runs/federate")), resume=bool(run.get("resume", False)), grid=grid)
    log.info(f"wrote {folder}/report.md\n{text}")

