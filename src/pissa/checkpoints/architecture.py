"""What a checkpoint's config.json says about its layers, read without keeping transformers in this process.

:func:`architecture` builds the model named by config.json on the meta device (no memory) and reports
its ``base_model_prefix``, which Linear / Conv1D layers store their weight (in, out), and the targets
``find_targets`` picks. Importing transformers and reading a config adds about 120 MB of modules to a
process for good, while the streaming runs that need the answer (``pissa init``, the streamed merge)
never use them: so the answer comes from a short-lived child, ``python -m pissa.checkpoints.architecture
ROOT TARGETS``, that prints it as JSON and exits. A child that fails is an error, never a silent fallback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pissa.adapter.base_layers import is_adaptable, is_conv1d
from pissa.adapter.targets import find_targets
from pissa.errors import PissaError


def meta_model(root: Path) -> nn.Module | None:
    """The architecture named by config.json, built on the meta device (no memory); None if unknown."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(str(root))
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:  # unknown model_type / architecture, or a config transformers cannot build
        return None


def describe(root: Path, targets: str | list[str] | None = None) -> dict[str, Any] | None:
    """What the architecture in ``root``'s config.json says, as JSON-able data: ``{"prefix": its
    base_model_prefix, "conv1d": {name: stored (in, out)} for every Linear / Conv1D layer, "targets":
    find_targets(model, targets)}`` (``"error"``: find_targets' message instead); None if transformers
    cannot build it."""
    model = meta_model(root)
    if model is None:
        return None
    found: dict[str, Any] = {
        "prefix": getattr(model, "base_model_prefix", ""),
        "conv1d": {n: is_conv1d(m) for n, m in model.named_modules() if n and is_adaptable(m)},
    }
    if targets is not None:
        try:
            found["targets"] = find_targets(model, targets)
        except PissaError as e:
            found["error"] = str(e)
    return found


def describe_in_child(root: Path, targets: str | list[str] | None = None) -> dict[str, Any] | None:
    """:func:`describe` computed by ``python -m pissa.checkpoints.architecture`` (same interpreter and import path);
    a PissaError with the child's last error line when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-m", __name__, str(root), json.dumps(targets)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        raise PissaError(f"reading the architecture of {root} in a child process failed ({e})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
        raise PissaError(f"reading the architecture of {root} in a child process failed: {last}")
    return json.loads(proc.stdout)


def architecture(root: Path, targets: str | list[str] | None = None) -> dict[str, Any] | None:
    """:func:`describe`, computed in a child process (:func:`describe_in_child`) unless this one has imported
    transformers already (or has no interpreter path to start one with)."""
    if "transformers" in sys.modules or not sys.executable:
        return describe(root, targets)
    return describe_in_child(root, targets)


def architecture_name(root: Path) -> str:
    """The architecture config.json names, for messages."""
    try:
        config = json.loads((root / "config.json").read_text())
    except json.JSONDecodeError:
        return "an unreadable config.json"
    return f"{(config.get('architectures') or [None])[0] or config.get('model_type')!r}"


if __name__ == "__main__":  # the child of describe_in_child: ROOT TARGETS_JSON -> the description as JSON on stdout
    sys.stdout.write(json.dumps(describe(Path(sys.argv[1]), json.loads(sys.argv[2]))))
