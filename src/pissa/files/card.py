"""Model cards: the ``README.md`` that every adapter folder, PEFT export and merged model gets.

A card is Hugging Face Hub metadata (YAML front matter between ``---`` lines, the keys the Hub reads:
``base_model``, ``library_name``, ``pipeline_tag``, ``license``, ``tags``) and a Markdown body: what the
folder is (method, rank, alpha, targets), how it was trained when a run made it (data, steps, learning rate,
the held-out evaluation before and after, the command) and how to load it.

- ``base_model``: the Hub id of an embedded base (``smollm2`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``), else
  the model as recorded (a local folder's path).
- ``library_name``: ``pissa`` for a pissa adapter folder, ``peft`` for the PEFT export (so the Hub offers
  PEFT's loading snippet), ``transformers`` for a merged model.
- ``pipeline_tag``: ``text-generation`` (causal LM) or ``text-classification`` (sequence classifier).
- ``license``: the base's, when its folder's own ``README.md`` states one; omitted otherwise.
- ``tags``: ``pissa``, the method, ``lora`` for the PEFT export, ``base_model:adapter:BASE`` (as PEFT writes).

The card is written into the folder's temporary twin with the other files (:mod:`pissa.files.atomic`), so it
appears with them. It is not part of an adapter folder's recorded integrity digests: editing it (as the Hub's
card editor does) does not invalidate the adapter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pissa.errors import PissaError
from pissa.runtime import hub

CARD_FILE = "README.md"
PIPELINE_TAGS = {"causal-lm": "text-generation", "seq-cls": "text-classification"}
"""Model kind -> the Hub's pipeline tag."""
TRAINING = "training"
"""The adapter document's entry of the run that trained it (:func:`training_record`)."""

_FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)\r?\n---\r?\n", re.DOTALL)


def training_record(data: str, steps: int, lr: float, eval_before: dict[str, float] | None = None,
                    eval_after: dict[str, float] | None = None, command: str | None = None) -> dict[str, Any]:
    """What a card says about the run that made an adapter (stored under :data:`TRAINING` in its document)."""
    record: dict[str, Any] = {"data": data, "steps": steps, "lr": lr}
    if eval_before is not None:
        record["eval_before"] = dict(eval_before)
    if eval_after is not None:
        record["eval_after"] = dict(eval_after)
    if command:
        record["command"] = command
    return record


def read_card(folder: str | Path) -> tuple[dict[str, Any], str]:
    """``(metadata, body)`` of the card in ``folder``; PissaError when it is missing or its front matter is not YAML."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise PissaError(f"{path} is missing; the folder has no model card")
    text = path.read_text(encoding="utf-8")
    match = _FRONT_MATTER.match(text)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict):
        raise PissaError(f"{path} has no YAML front matter between --- lines")
    return meta, text[match.end():] if match else text


def adapter_card(doc: dict[str, Any]) -> str:
    """The card of a pissa adapter folder from its ``adapter_config.json`` document ``doc``."""
    base, config = doc.get("base_model") or {}, doc["config"]
    model = str(base.get("model") or "the base model")
    load = (f"from pissa.hub import load_model\nimport pissa\n\n"
            f"model, tokenizer = load_model({model!r}{_kind_arg(base)})  # the original base model\n"
            "model = pissa.load_adapter(model, \"path/to/this/folder\")")
    body = _facts(config, len(doc["layers"]), doc.get("base_fingerprint")) + _training(doc.get(TRAINING)) + [
        "## Load it", "",
        "```python", load, "```", "",
        "or talk to it: `pissa generate --adapter path/to/this/folder --chat`; export a PEFT LoRA (rank 2r, for "
        "any LoRA server) with `pissa export path/to/this/folder --out peft/` or a merged model with "
        "`pissa export path/to/this/folder --merged --out merged/`.",
    ]
    return _card(_metadata(base, config, "pissa"), f"{config['method']} adapter of {model}", body)


def peft_card(config: dict[str, Any], base: dict[str, Any] | None, layers: int, rank: int,
              training: dict[str, Any] | None = None) -> str:
    """The card of a PEFT LoRA export (rank ``rank``, ``layers`` layers) of an adapter made with ``config`` (an
    AdapterConfig as a dict) on ``base`` (``{"model", "kind"}``), trained by ``training``: library_name peft, so
    the Hub renders it as a PEFT adapter."""
    base = base or {}
    model = _hub_id(str(base.get("model") or "the base model"))
    auto = "AutoModelForSequenceClassification" if base.get("kind") == "seq-cls" else "AutoModelForCausalLM"
    load = (f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
            f"base = {auto}.from_pretrained({model!r})\n"
            "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")")
    body = [f"A rank-{rank} LoRA for PEFT, exported by pissa from a {config['method']} adapter "
            "(the trained update W_res + B'A' - W written as one LoRA on the original weights).", "",
            *_facts(config, layers, None), *_training(training), "## Load it", "", "```python", load, "```"]
    return _card(_metadata(base, config, "peft", ["lora"]), f"LoRA of {model} (from pissa {config['method']})", body)


def merged_card(doc: dict[str, Any]) -> str:
    """The card of a merged model (the base with the adapter ``doc`` folded into its weights)."""
    base, config = doc.get("base_model") or {}, doc["config"]
    model = _hub_id(str(base.get("model") or "the base model"))
    auto = "AutoModelForSequenceClassification" if base.get("kind") == "seq-cls" else "AutoModelForCausalLM"
    load = f"from transformers import {auto}\n\nmodel = {auto}.from_pretrained(\"path/to/this/folder\")"
    body = [f"{model} with a {config['method']} adapter merged into its weights by pissa: a plain checkpoint.", "",
            *_facts(config, len(doc["layers"]), doc.get("base_fingerprint")), *_training(doc.get(TRAINING)),
            "## Load it", "", "```python", load, "```"]
    meta = _metadata(base, config, "transformers", ["merge"])
    meta["tags"] = [t.replace("base_model:adapter:", "base_model:merge:") for t in meta["tags"]]
    return _card(meta, f"{model} merged with a pissa {config['method']} adapter", body)


def base_license(model: str) -> str | None:
    """The license the base model's folder states in its own README.md front matter, if any."""
    entry = hub.EMBEDDED_MODELS.get(model)
    try:  # a GGUF-packaged model: its converted folder, never converted here
        folder = Path(model) if entry is None else (
            hub.cache_dir() / entry.cache_name if entry.path.endswith(".gguf") else hub.resolve_model(model))
        license_ = read_card(folder)[0].get("license")
    except (PissaError, OSError, UnicodeDecodeError):
        return None
    return str(license_) if license_ else None


def _hub_id(model: str) -> str:
    """The Hub id of an embedded model, else ``model`` as given."""
    entry = hub.EMBEDDED_MODELS.get(model)
    return entry.upstream if entry else model


def _kind_arg(base: dict[str, Any]) -> str:
    return f", kind={base['kind']!r}" if base.get("kind") and base.get("kind") != "causal-lm" else ""


def _metadata(base: dict[str, Any], config: dict[str, Any], library: str, extra_tags: tuple[str, ...] | list[str] = ())\
        -> dict[str, Any]:
    meta: dict[str, Any] = {}
    model = base.get("model")
    if model:
        meta["base_model"] = _hub_id(str(model))
    meta["library_name"] = library
    if base.get("kind") in PIPELINE_TAGS:
        meta["pipeline_tag"] = PIPELINE_TAGS[base["kind"]]
    license_ = base_license(str(model)) if model else None
    if license_:
        meta["license"] = license_
    tags = ["pissa", str(config["method"]), *extra_tags]
    meta["tags"] = list(dict.fromkeys(tags + ([f"base_model:adapter:{meta['base_model']}"] if model else [])))
    return meta


def _facts(config: dict[str, Any], layers: int, fingerprint: str | None) -> list[str]:
    rank, alpha = config["rank"], config.get("alpha")
    scale = (alpha if alpha is not None else rank) / rank
    targets = config["targets"] if isinstance(config["targets"], str) else ", ".join(config["targets"])
    rows = [("method", config["method"]), ("rank", rank),
            ("alpha", f"{alpha if alpha is not None else rank} (scaling {scale:g})"),
            ("targets", f"{targets} ({layers} layers)"), ("quantize", config.get("quantize") or "none"),
            ("seed", config.get("seed"))] + ([("base fingerprint", f"`{fingerprint}`")] if fingerprint else [])
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _training(run: dict[str, Any] | None) -> list[str]:
    if not run:
        return []
    lines = ["## Training", "", f"- data: `{run['data']}`", f"- steps: {run['steps']}", f"- learning rate: {run['lr']:g}"]
    evals = [(when, run[key]) for when, key in (("before", "eval_before"), ("after", "eval_after")) if run.get(key)]
    if evals:
        names = sorted({k for _, e in evals for k in e})
        lines += ["", "Held-out evaluation:", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  *[f"| {when} training | " + " | ".join(_num(e.get(n)) for n in names) + " |" for when, e in evals]]
    if run.get("command"):
        lines += ["", "Made by:", "", "```", str(run["command"]), "```"]
    return lines + [""]


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _card(meta: dict[str, Any], title: str, body: list[str]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n# " + title + "\n\n" + "\n".join(body).rstrip() + "\n"
