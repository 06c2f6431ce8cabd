"""The command line generated from the config dataclasses: every option present, --config files,
resume refusing changed options, recorded bases, and the package's import graph."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import finetune, interrupt_after
from pissa import options
from pissa.adapter.config import AdapterConfig
from pissa.checkpoints.config import InitConfig
from pissa.cli import build_parser, main
from pissa.cli import parser as cli_parser
from pissa.training.config import RunConfig

SRC = Path(pissa.__file__).parent


def _help(*command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))  # type: ignore[union-attr]
    p = sub.choices[command[0]]
    for name in command[1:]:
        p = next(a for a in p._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[name]
    return p.format_help()


@pytest.mark.parametrize("command", ["finetune", "compare", "init"])
def test_help_lists_every_adapter_config_field(command: str) -> None:
    text = _help(command)
    for f in dataclasses.fields(AdapterConfig):
        if command == "compare" and f.name == "method":
            assert "--methods" in text
            continue
        assert "--" + f.name.replace("_", "-") in text, f"--{f.name} missing from pissa {command} --help"
    assert "(default: None)" not in text and text.count("(default: 16)") == 2  # --rank and --block, once each


def test_help_text_is_the_field_docstring() -> None:
    docs = options.field_docs(AdapterConfig)
    assert docs["rank"].startswith("Rank r of the trainable factors")
    assert " ".join(_help("finetune").split()).count("Rank r of the trainable factors") == 1
    assert "(required)" in _help("init") and "(default: None)" not in _help("init")


def test_options_parse_types_lists_none_and_choices() -> None:
    p = build_parser()
    args = p.parse_args(["finetune", "--targets", "q_proj,v_proj", "--alpha", "none", "--dropout", "0.1", "--svd", "exact",
                         "--factor-dtype", "bfloat16", "--quant-iters", "3", "--niter", "7", "--block", "32"])
    cfg, explicit = cli_parser.resolve(RunConfig, args)
    a = cfg.adapter
    assert a.targets == ["q_proj", "v_proj"] and a.alpha is None and a.dropout == 0.1 and a.svd == "exact"
    assert (a.factor_dtype, a.quant_iters, a.niter, a.block) == ("bfloat16", 3, 7, 32)
    assert set(explicit) == {"targets", "alpha", "dropout", "svd", "factor_dtype", "quant_iters", "niter", "block"}
    for bad in (["--rank", "x"], ["--svd", "fast"], ["--method", "dora"], ["--factor-dtype", "int8"]):
        with pytest.raises(pissa.PissaError):
            p.parse_args(["finetune", *bad])


def test_config_file_precedence_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("steps: 3\nadapter:\n  rank: 8\n  dropout: 0.2\n")
    (tmp_path / "b.json").write_text(json.dumps({"steps": 5, "adapter": {"rank": 4}}))
    args = build_parser().parse_args(["finetune", "--rank", "2"])
    cfg, _ = cli_parser.resolve(RunConfig, args, str(tmp_path / "a.yaml"))
    assert (cfg.steps, cfg.adapter.rank, cfg.adapter.dropout) == (3, 2, 0.2)  # the command line wins over the file
    cfg, _ = cli_parser.resolve(RunConfig, build_parser().parse_args(["finetune"]), str(tmp_path / "b.json"))
    assert (cfg.steps, cfg.adapter.rank) == (5, 4)
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    (tmp_path / "broken.json").write_text("{")
    for name, message in (("bad.yaml", r"unknown option\(s\) stepz"), ("broken.json", "cannot be parsed"),
                          ("missing.yaml", "does not exist"), ("a.toml", "must end in")):
        (tmp_path / "a.toml").write_text("x = 1")
        with pytest.raises(pissa.PissaError, match=message):
            cli_parser.resolve(RunConfig, build_parser().parse_args(["finetune"]), str(tmp_path / name))


def test_written_config_reruns_the_same_run(tiny: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert finetune(tiny, first, "--steps", "4", "--dropout", "0.1", "--targets", "q_proj,v_proj", "--alpha", "8") == 0
    saved = options.read_config_file(first / "config.yaml")
    assert saved["dropout"] == 0.1 and saved["targets"] == ["q_proj", "v_proj"] and saved["alpha"] == 8
    second = tmp_path / "second"
    assert main(["finetune", "--config", str(first / "config.yaml"), "--out", str(second)]) == 0
    a, b = (load_file(str(p / "adapter" / "adapter.safetensors")) for p in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (first, second))
    assert ma["train_loss"] == mb["train_loss"] and ma["eval_after"] == mb["eval_after"]
    assert (first / "config.yaml").read_text() == (second / "config.yaml").read_text()


@pytest.mark.parametrize("changed, message", [
    (["--rank", "8"], "--rank 8 differs from the interrupted run's 4"),
    (["--dropout", "0.5"], "--dropout 0.5 differs from the interrupted run's 0.0"),
    (["--targets", "q_proj"], "--targets q_proj differs from the interrupted run's"),
    (["--max-length", "32"], "--max-length 32 differs from the interrupted run's 64"),
])
def test_resume_refuses_a_changed_option(tiny: Path, tmp_path: Path, monkeypatch, capsys, changed, message) -> None:
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    assert finetune(tiny, out, "--save-every", "1") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert finetune(tiny, out, "--resume", *changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert (tmp_path / "run.partial" / "checkpoint").is_dir() and not out.exists()  # nothing lost, nothing written
    # options that cannot change the result are accepted: threads, checkpoint interval
    assert finetune(tiny, out, "--resume", "--threads", "2", "--save-every", "3") == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8


def test_export_defaults_to_the_recorded_base_and_names_it_on_a_wrong_base(tiny: Path, tmp_path: Path, capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert finetune(tiny, run, "--steps", "3") == 0
    doc = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert doc["base_model"] == {"model": str((tiny / "llama").resolve()), "kind": "causal-lm"}
    assert main(["export", str(run / "adapter"), "--out", str(tmp_path / "peft")]) == 0  # no --model: the recorded base
    base = AutoModelForCausalLM.from_pretrained(tiny / "llama")
    trained = pissa.load_adapter(AutoModelForCausalLM.from_pretrained(tiny / "llama"), run / "adapter")
    ids = torch.tensor([[1, 5, 9, 3]])
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)
    other = AutoModelForCausalLM.from_pretrained(tiny / "llama")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(pissa.PissaError, match=f"load it onto {(tiny / 'llama').resolve()} \\(causal-lm, fingerprint"):
        pissa.load_adapter(other, run / "adapter")


def test_an_adapter_trained_on_a_bfloat16_base_exports_and_analyzes_from_its_record(tiny: Path, tmp_path: Path) -> None:
    """The digests cover the base's dtype: commands load the base in the dtype the adapter records;
    loading it onto a float32 base in Python names the dtype to use."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert finetune(tiny, run, "--steps", "2", "--dtype", "bfloat16") == 0
    doc = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert {m["base_dtype"] for m in doc["layers"].values()} == {"bfloat16"}
    assert main(["export", str(run / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert main(["analyze", "spectrum", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "spectrum")]) == 0
    with pytest.raises(pissa.PissaError, match="made on a bfloat16 base and this model.s weights are float32; load the"):
        pissa.load_adapter(AutoModelForCausalLM.from_pretrained(tiny / "llama"), run / "adapter")
    model = pissa.load_adapter(AutoModelForCausalLM.from_pretrained(tiny / "llama", dtype=torch.bfloat16), run / "adapter")
    assert len(list(pissa.adapted_layers(model))) == 14
    # the streamed merge into the float32 checkpoint: the bfloat16 model's merged weights, stored as float32;
    # the weights no adapter touches stay the checkpoint's own
    assert main(["export", str(run / "adapter"), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    adapted = {f"{n}.weight" for n, _ in pissa.adapted_layers(model)}
    expected, base = pissa.merge(model).state_dict(), AutoModelForCausalLM.from_pretrained(tiny / "llama").state_dict()
    assert len(adapted) == 14
    for name, t in merged.items():
        assert t.dtype == torch.float32 and torch.equal(t, expected[name].float() if name in adapted else base[name]), name


def test_every_command_takes_comma_separated_targets(tmp_path: Path) -> None:
    p = build_parser()
    cfg, _ = cli_parser.resolve(InitConfig, p.parse_args(["init", "--model", "m", "--out", "o", "--targets", "q_proj,v_proj"]))
    run, _ = cli_parser.resolve(RunConfig, p.parse_args(["finetune", "--targets", "q_proj,v_proj"]))
    assert cfg.adapter.targets == run.adapter.targets == ["q_proj", "v_proj"]


# --- the package's import graph --------------------------------------------------------------------
