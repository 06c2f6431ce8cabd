"""lm-evaluation-harness (``lm-eval``) on a model in memory: a base, or a base with a pissa adapter (no merge).

    model, tok = pissa.hub.load_model("smollm2")
    pissa.load_adapter(model, "runs/finetune-pissa/adapter")
    results = harness(model, tok, EvalConfig(tasks=["rotten_tomatoes"], limit=100))
    results["results"]["pissa_rotten_tomatoes"]["acc,none"]

The model goes to the harness as its ``HFLM`` wrapping the instance (``HFLM(pretrained=model, tokenizer=tok)``),
so the adapter's layers compute as they do in training. Nothing reaches the hub (``HF_DATASETS_OFFLINE=1``):
the built-in tasks are task YAMLs written into a temporary folder, each over a JSON-lines file of data pissa
ships, and handed to lm-eval's ``TaskManager(include_path=...)``:

- ``rotten_tomatoes`` (task ``pissa_rotten_tomatoes``): the test split every pissa command scores
  (:func:`pissa.data.datasets.load_data`), as a ``multiple_choice`` task: context ``"Review: ...\\nSentiment:"``,
  choices ``negative`` / ``positive`` after the delimiter ``" "``, metric ``acc`` (the choice of largest summed
  log-likelihood): the harness's form of pissa's own likelihood accuracy on the same examples.

A user's task is a path to a task YAML or to a folder of them (``tasks: [path]``), read as lm-eval reads its own.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from pissa.data.datasets import load_data
from pissa.errors import PissaError

BUILTIN_TASKS = ("rotten_tomatoes",)
"""The tasks pissa defines over its own data (by name in ``tasks``)."""


@dataclass
class EvalConfig:
    """``pissa eval``: lm-evaluation-harness scores of a model, with or without an adapter."""

    tasks: list[str] = field(default_factory=lambda: ["rotten_tomatoes"])
    """Comma-separated tasks: built-in ones by name (rotten_tomatoes) or paths to a task YAML or a folder of them."""
    out: str = "eval"
    """Output folder: OUT/eval.json (the harness's results)."""
    model: str | None = None
    """Embedded model (smollm2) or a local Hugging Face causal-LM folder; default: the base the adapter records, else smollm2."""
    adapter: str | None = None
    """Adapter folder (save_adapter / pissa finetune) applied to the model (no merge)."""
    limit: int | None = None
    """Score only the first N documents of each task."""
    batch_size: int = 16
    """Requests per forward pass."""
    device: str = "auto"
    """Where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base; an adapter made on another dtype is converted."""
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """CPU threads (default: the cores available to this process)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise PissaError("`tasks` is empty; name a built-in task (rotten_tomatoes) or a task YAML path")
        for name, value, low in (("batch_size", self.batch_size, 1), ("limit", self.limit, 1), ("threads", self.threads, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise PissaError(f"`{name}` must be an integer >= {low}, got {value!r}")


def _rotten_tomatoes(folder: Path) -> dict[str, Any]:
    """The ``pissa_rotten_tomatoes`` task config over ``folder/rotten_tomatoes.jsonl`` (written here)."""
    data = load_data("rotten_tomatoes")
    assert data.labels is not None
    rows = folder / "rotten_tomatoes.jsonl"
    with rows.open("w", encoding="utf-8") as f:
        for e in data.test:
            f.write(json.dumps({"prompt": e.prompt, "label": data.labels.index(e.completion)}) + "\n")
    return {
        "task": "pissa_rotten_tomatoes",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(rows)}, "cache_dir": str(folder / "cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": [label.strip() for label in data.labels],
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


BUILDERS = {"rotten_tomatoes": _rotten_tomatoes}


def _task_names(path: Path) -> list[str]:
    """The ``task`` names of a task YAML, or of every YAML in a folder (recursively); lm-eval's ``!function`` tags
    read as None (only the names are wanted here)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
    names = []
    for file in files:
        try:
            doc = yaml.load(file.read_text(encoding="utf-8"), Loader=Loader)
        except (OSError, yaml.YAMLError) as err:
            raise PissaError(f"`tasks`: cannot read {file}: {str(err).splitlines()[0]}") from None
        task = doc.get("task") if isinstance(doc, dict) else None
        names += [task] if isinstance(task, str) else [t for t in task or () if isinstance(t, str)]
    if not names:
        raise PissaError(f"`tasks`: {path} defines no task (no `task:` key in its YAML)")
    return names


@contextmanager
def task_folder(tasks: list[str]) -> Iterator[tuple[list[str], list[str]]]:
    """``(task names, include paths)`` for lm-eval: built-in tasks written as YAML into a temporary folder (removed
    afterwards), user paths read in place. PissaError naming ``tasks`` for anything else."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="pissa-lm-eval-") as tmp:
        names, include = [], []
        for task in tasks:
            if task in BUILDERS:
                config = BUILDERS[task](Path(tmp))
                (Path(tmp) / f"{task}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
                names.append(config["task"])
                if tmp not in include:
                    include.append(tmp)
            elif Path(task).expanduser().exists():
                path = Path(task).expanduser().resolve()
                names += _task_names(path)
                include.append(str(path if path.is_dir() else path.parent))
            else:
                raise PissaError(f"`tasks`: unknown task '{task}'; use a built-in one ({', '.join(BUILTIN_TASKS)}) "
                                 "or a path to a task YAML or a folder of them")
        yield names, include


def lm_eval_module() -> Any:
    """The ``lm_eval`` package, or a PissaError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise PissaError("pissa eval needs lm-evaluation-harness; run: pip install 'pissa[eval]' "
                         "(or pip install lm-eval)") from None
    return lm_eval


def harness(model: nn.Module, tokenizer: Any, cfg: EvalConfig) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``model`` (in place, adapter and all) on ``cfg.tasks``, offline; returns its
    results dict (``results``, ``n-samples``, ``versions``, ...; no per-sample logs)."""
    lm_eval = lm_eval_module()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    with task_folder(cfg.tasks) as (names, include):
        manager = TaskManager(include_path=include, include_defaults=False)  # offline: only these tasks
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise PissaError(f"`tasks`: lm-eval finds no task named {', '.join(unknown)} in {', '.join(include)}")
        results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=cfg.limit,
                                          log_samples=False, verbosity="ERROR")
    assert results is not None
    return dict(results)


def results_json(results: dict[str, Any], cfg: EvalConfig) -> str:
    """The JSON text of OUT/eval.json: the harness's ``results``, ``n-samples``, ``versions``, ``higher_is_better``
    and the run's model, adapter, tasks and limit."""
    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "n-samples", "versions", "higher_is_better") if k in results}
    run = {"model": cfg.model, "adapter": cfg.adapter, "tasks": cfg.tasks, "limit": cfg.limit}
    return json.dumps({**run, **keep}, indent=2, default=handle_non_serializable)


def table(results: dict[str, Any]) -> str:
    """The harness's own results table (markdown), as ``lm_eval`` prints it."""
    from lm_eval.utils import make_table

    return str(make_table(results))
