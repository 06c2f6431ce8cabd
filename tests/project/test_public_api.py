"""The public names of shared/design.md's contract import from the package face, whatever the layout inside."""

from __future__ import annotations

import importlib

import torch

import pissa


def test_every_public_name_imports_and_is_what_the_contract_says() -> None:
    for name in pissa.__all__:
        assert getattr(pissa, name) is not None, name
    assert callable(pissa.attach) and callable(pissa.decompose) and callable(pissa.load_sharded)
    assert "pissa" in pissa.METHODS and "lora" in pissa.METHODS
    assert issubclass(pissa.PissaError, ValueError)
    d = pissa.decompose(torch.randn(12, 8, dtype=torch.float64), 2)  # a function, not a submodule
    assert d.A.shape == (2, 8) and d.B.shape == (12, 2) and d.residual.shape == (12, 8)


def test_the_embedded_models_are_pissa_hub() -> None:
    from pissa.hub import load_model  # `pissa.hub` as a module path, as users import it

    assert pissa.hub.load_model is load_model is importlib.import_module("pissa.runtime.hub").load_model


def test_importing_pissa_leaves_the_root_logger_alone() -> None:
    """No import of the command line (every command and its libraries: Flower, Opacus, trackers) configures
    logging for the application: the root logger gets no handler, so no line is printed twice."""
    import subprocess
    import sys

    code = "import logging, pissa.cli; print(len(logging.getLogger().handlers))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0"
