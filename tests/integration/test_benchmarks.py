"""The benchmarks' results: the README quotes them verbatim, and one writer produces them whole."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"


def _load_results_module():
    spec = importlib.util.spec_from_file_location("_bench_results", BENCHMARKS / "_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- markdown tables -----------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_rule(line: str) -> bool:
    return all(re.fullmatch(r":?-{3,}:?", c) for c in _cells(line))


def tables(lines: list[str]) -> list[tuple[int, list[str], list[list[str]]]]:
    """Every markdown table in ``lines``: (index of its header line, header cells, data rows' cells)."""
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|") and _is_rule(lines[i + 1]):
            start, header, rows = i, _cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            found.append((start, header, rows))
        else:
            i += 1
    return found


def section(text: str, heading: str) -> list[str]:
    """The lines of the ``## heading`` section (up to the next heading of level 2 or 1)."""
    lines = text.splitlines()
    if heading not in lines:
        return []
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if re.match(r"#{1,2} ", lines[i])), len(lines))
    return lines[start:end]


def readme_init_speed_tables() -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(results file, header, rows, setup lines) of each table in the README's init-speed section.

    A table quotes the results file that the text since the previous table links to
    (``benchmarks/results/NAME.md``), else the previous table's file (the first: ``init_speed.md``);
    setup lines are the lines of that text that start with "Model " (the run's model, rank, threads and
    repeats, as the results file states them).
    """
    lines = section((REPO / "README.md").read_text(), "## Init speed and exactness")
    out, prev_end = [], 0
    for start, header, rows in tables(lines):
        before = lines[prev_end:start]
        links = re.findall(r"benchmarks/results/(init_speed[\w-]*\.md)", "\n".join(before))
        setup = [line for line in before if line.startswith("Model ")]
        source = links[-1] if links else (out[-1][0] if out else "init_speed.md")  # else the previous table's file
        out.append((source, header, rows, setup))
        prev_end = start + 2 + len(rows)
    return out


def test_readme_has_init_speed_tables():
    quoted = readme_init_speed_tables()
    assert quoted, "the README's init-speed section has no table"
    assert quoted[0][1][0] == "init", "the section starts with the init-speed table itself"


@pytest.mark.parametrize("index", range(len(readme_init_speed_tables())))
def test_readme_init_speed_table_matches_results(index):
    """The README's init-speed tables are copies of the tables in benchmarks/results/ (re-run, then copy)."""
    source, header, rows, setup = readme_init_speed_tables()[index]
    path = RESULTS / source
    assert path.is_file(), f"README quotes {path.relative_to(REPO)}, which does not exist"
    text = path.read_text()
    for line in setup:
        assert line in text.splitlines(), f"README says {line!r}; {path.relative_to(REPO)} does not"
    candidates = [(h, r) for _, h, r in tables(text.splitlines()) if h == header]
    assert candidates, f"{path.relative_to(REPO)} has no table with the README's columns {header}"
    assert any(r == rows for _, r in candidates), (
        f"README's init-speed table differs from {path.relative_to(REPO)}:\nREADME: {rows}\nresults: {[r for _, r in candidates]}"
    )


# --- the shared writer -----------------------------------------------------------------------------


def test_writer_records_the_run(tmp_path):
    res_mod = _load_results_module()
    dest = tmp_path / "demo.md"
    argv = [str(BENCHMARKS / "demo.py"), "--rank", "16", "--name", "it's"]
    with res_mod.Results("demo", "A demo", dest=dest, argv=argv, env={"OMP_NUM_THREADS": "1"}) as res:
        res.add("Some text.")
        res.table(["a", "b"], [[1, "x|y"]], align="lr")
        assert not dest.exists()  # nothing before the end
    text = dest.read_text()
    assert text.startswith("# A demo\n")
    assert "Command: `OMP_NUM_THREADS=1 python benchmarks/demo.py --rank 16 --name 'it'\"'\"'s'`" in text
    commit = re.search(r"Commit: (\S+)", text).group(1)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", commit)
    load = re.search(r"Load average \(1, 5, 15 min\): ([\d.]+), ([\d.]+), ([\d.]+) at the start; "
                     r"([\d.]+), ([\d.]+), ([\d.]+) at the end", text)
    assert load, text
    assert f"{os.cpu_count()} logical CPUs" in text and "usable by this process" in text
    assert "torch threads" in text and "Versions: python " in text and "torch " in text
    assert "| a | b |\n|:---|---:|\n| 1 | x\\|y |" in text
    assert "Some text." in text
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left over


def test_writer_writes_nothing_when_the_script_fails(tmp_path):
    res_mod = _load_results_module()
    dest = tmp_path / "demo.md"
    results = res_mod.Results("demo", "A demo", dest=dest, argv=["benchmarks/demo.py"])
    with pytest.raises(RuntimeError, match="boom"), results as res:
        res.add("half of it")
        res.artifact("demo.png").write_bytes(b"png")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    dest.write_text("the previous results\n")  # an earlier file stays as it was
    with pytest.raises(RuntimeError), res_mod.Results("demo", "A demo", dest=dest, argv=["benchmarks/demo.py"]):
        raise RuntimeError("boom")
    assert dest.read_text() == "the previous results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["demo.md"]


def test_writer_moves_artifacts_next_to_the_file(tmp_path):
    res_mod = _load_results_module()
    with res_mod.Results("demo", "A demo", dest=tmp_path / "demo.md", argv=["benchmarks/demo.py"]) as res:
        res.artifact("demo.png").write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.md", "demo.png"]


def test_writer_destinations():
    res_mod = _load_results_module()
    assert res_mod.results_path("init_speed", update=False) == REPO / "bench_out" / "init_speed.md"
    assert res_mod.results_path("init_speed_r64", update=True) == RESULTS / "init_speed_r64.md"
    with pytest.raises(ValueError):
        res_mod.results_path("../README", update=True)
    assert "/bench_out/" in (REPO / ".gitignore").read_text().splitlines()


def test_paired_ratios():
    res_mod = _load_results_module()
    row = res_mod.paired_row("a / b", [1.0, 3.0, 2.0], [2.0, 2.0, 4.0])
    assert row == ["a / b", "3", "0.50x", "0.50x", "1.50x", "2 of 3"]


SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_describe_no_machine_by_hand(script):
    """Machine descriptions come from the writer's measurements, never from a script's text."""
    text = script.read_text()
    phrases = ("2-core", "2 cores", "shared CPU", "shared, loaded", "heavily loaded", "shared with other jobs", "load average ~")
    for phrase in phrases:
        assert phrase not in text, f"{script.name} describes the machine by hand: {phrase!r}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_write_through_the_shared_writer(script):
    """Every script takes --update-results / --name and writes its results file through benchmarks/_results.py."""
    text = script.read_text()
    assert "add_results_options(" in text and "Results.from_args(" in text, f"{script.name} bypasses benchmarks/_results.py"
    assert "atomic_write_text" not in text and 'add_argument("--out"' not in text


# --- smoke runs of benchmark scripts on the tiny model ------------------------------------------------


def test_family_sweeps_welore_on_a_compressed_copy_next_to_lora_at_its_default(tiny: Path, tmp_path: Path) -> None:
    """benchmarks/family.py --methods welore: compresses the model once into the cache, sweeps WeLore-COFT on it,
    and runs LoRA at its default rate on the original model, each in a fresh process."""
    from safetensors.torch import load_file

    from pissa.methods.registry import METHODS

    cache, name = tmp_path / "cache", f"test_family_welore_{os.getpid()}"
    cmd = [sys.executable, str(BENCHMARKS / "family.py"), "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"),
           "--methods", "welore", "--against", "lora", "--lrs", "1e-3,1e-1", "--steps", "2", "--batch-size", "2",
           "--rank", "2", "--eval-size", "4", "--val-size", "4", "--compressed-cache", str(cache),
           "--work", str(tmp_path / "work"), "--name", name]
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    out = REPO / "bench_out" / f"{name}.md"
    try:
        text = out.read_text()
    finally:
        out.unlink(missing_ok=True)
    [folder] = list(cache.iterdir())
    assert folder.name.startswith("llama-") and folder.name.endswith("-reduction0.1")
    assert json.loads((folder / "welore.json").read_text())["requested"] == 0.1
    factors = sum(t.numel() for k, t in load_file(str(folder / "model.safetensors")).items() if k.endswith((".A", ".B")))
    assert factors > 0
    built = (folder / "model.safetensors").stat().st_mtime_ns

    [(_, _, chosen)] = tables(section(text, "## Each method at the learning rate chosen on validation data"))
    [(_, sweep_header, sweep)] = tables(section(text, "## Learning-rate sweep (validation loss after training; "
                                                      "chosen rate in bold)"))
    [(_, header, compare)] = tables(section(text, "## At the chosen rate, next to lora at their defaults"))
    losses = {float(h.removeprefix("lr ")): float(c.strip("*")) for h, c in zip(sweep_header[1:], sweep[0][1:], strict=True)}
    best = min(losses, key=losses.__getitem__)
    assert sweep[0][0] == "welore" and sweep[0][1 + sorted(losses).index(best)].startswith("**")
    assert chosen[0][:3] == ["welore", f"{best:g}", f"{factors:,}"] and chosen[0][-2:] == ["–", "–"]
    assert header[:3] == ["method", "model", "lr"] and header[-1] == "peak / lora's"
    assert compare[0][:4] == ["welore", "compressed", f"{best:g} (chosen)", f"{factors:,}"]
    assert compare[1][:3] == ["lora", "original", f"{METHODS['lora'].learning_rate:g} (default)"]
    assert compare[1][9] == "1.00x" and compare[1][-1] == "1.00x"
    assert compare[0][5] == chosen[0][4]  # both tables show the one run at the chosen rate

    subprocess.run(cmd, check=True, env=env, capture_output=True)  # the compressed copy is reused, not rebuilt
    (REPO / "bench_out" / f"{name}.md").unlink()
    assert list(cache.iterdir()) == [folder] and (folder / "model.safetensors").stat().st_mtime_ns == built


def _load_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_default_lr_extends_a_grid_past_the_edge_holding_the_best() -> None:
    next_rate = _load_benchmark("default_lr").next_rate
    assert next_rate({1e-4: 2.0, 1e-3: 1.0}, 2.0) == 2e-3
    assert next_rate({1e-4: 1.0, 1e-3: 2.0}, 2.0) == 5e-5
    assert next_rate({1e-4: 2.0, 1e-3: 1.0, 1e-2: 1.5}, 2.0) is None
    assert next_rate({1e-4: 1.0}, 2.0) is None


def test_cached_runs_survive_a_new_option_but_not_a_changed_one() -> None:
    """A sweep run's stored record still matches after RunConfig gains an option (absent: its default), never after a
    value changes or when it names an option RunConfig no longer has."""
    from pissa.training.config import RunConfig

    same_run = _load_benchmark("_validation").same_run
    cfg = RunConfig(lr=2.5e-4, steps=150, save_every=0)
    record = json.loads(json.dumps({"config": cfg.to_dict()}))
    assert same_run(record, cfg)
    older = json.loads(json.dumps(record))
    del older["config"]["eval_dtype"], older["config"]["tracking"]
    assert same_run(older, cfg)
    assert not same_run(older, dataclasses.replace(cfg, eval_dtype="bfloat16"))
    assert not same_run(record, dataclasses.replace(cfg, lr=5e-4))
    assert not same_run({"config": {**record["config"], "removed_option": 1}}, cfg)
    assert not same_run({}, cfg)


def test_default_lr_sweeps_seeds_then_compares_at_the_method_records(tiny: Path, tmp_path: Path) -> None:
    """benchmarks/default_lr.py on the tiny model: the sweep's per-seed validation losses and their mean, the final
    pissa compare per seed at the records' default_lr, the paired differences; refused (nothing written) when a
    record differs from the chosen rate."""
    from pissa.methods.registry import METHODS

    pissa_lr, lora_lr = METHODS["pissa"].learning_rate, METHODS["lora"].learning_rate
    name = f"test_default_lr_{os.getpid()}"
    cmd = [sys.executable, str(BENCHMARKS / "default_lr.py"), "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"),
           "--seeds", "0,1", "--steps", "2", "--batch-size", "2", "--rank", "2", "--val-size", "4", "--eval-size", "4",
           "--jobs", "2", "--work", str(tmp_path / "work"), "--name", name, "--grid", f"lora={lora_lr:g}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*cmd, "--grid", f"pissa={pissa_lr:g}"], check=True, env=env, capture_output=True)
    out = REPO / "bench_out" / f"{name}.md"
    try:
        text = out.read_text()
    finally:
        out.unlink(missing_ok=True)
    [(_, header, loss), _] = tables(section(text, "## Learning-rate sweep (validation split)"))
    assert header == ["method", "lr", "mean ± sd", "seed 0", "seed 1"]
    assert [row[:2] for row in loss] == [["pissa", f"{pissa_lr:g}"], ["lora", f"{lora_lr:g}"]]
    for row in loss:
        mean = float(row[2].strip("*").split(" ± ")[0])
        assert row[2].startswith("**") and abs(mean - (float(row[3]) + float(row[4])) / 2) < 1e-4
    [(_, _, final)] = tables(section(text, "## pissa compare at the new defaults (test split)"))
    [(_, _, diffs)] = tables(section(text, "## Does pissa end ahead of lora?"))
    after = {(row[0], row[1]): [float(x) for x in row[3:]] for row in final}
    [row] = [r for r in diffs if r[0] == "test loss after"]
    expected = [p - q for p, q in zip(after["pissa", "test loss after"], after["lora", "test loss after"], strict=True)]
    assert [float(x) for x in row[2:4]] == pytest.approx(expected, abs=2e-4)
    ahead = int(row[4].removesuffix(" of 2"))  # counted on unrounded losses: a difference within rounding may go either way
    assert sum(d < -2e-4 for d in expected) <= ahead <= sum(d < 2e-4 for d in expected)

    refused = subprocess.run([*cmd, "--grid", f"pissa={pissa_lr * 10:g}"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "differs from the chosen" in refused.stderr and not out.exists()


def test_generation_eval_paired_difference() -> None:
    paired_difference = _load_benchmark("generation_eval").paired_difference
    assert paired_difference([True, True, False, False], [True, False, False, False]) == (0.25, 0.25)
    assert paired_difference([True, False], [True, False]) == (0.0, 0.0)


def test_generation_eval_runs_anchor_float32_and_bfloat16_side_by_side() -> None:
    """benchmarks/generation_eval.py, quick form on the embedded SmolLM2: pissa float32 agrees with transformers'
    generate answer by answer (else the script fails), bfloat16 is reported against float32."""
    name = f"test_generation_eval_{os.getpid()}"
    cmd = [sys.executable, str(BENCHMARKS / "generation_eval.py"), "--n", "4", "--batch-size", "4", "--anchor-batch", "4",
           "--max-new-tokens", "6", "--threads", "1", "--name", name]
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}, capture_output=True)
    out = REPO / "bench_out" / f"{name}.md"
    try:
        text = out.read_text()
    finally:
        out.unlink(missing_ok=True)
    [(_, header, rows), (_, _, [bf16])] = tables(text.splitlines())
    assert header[:3] == ["variant", "eval dtype", "batch"] and header[-2:] == ["same answers", "same texts"]
    assert [r[:2] for r in rows] == [["anchor", "float32"], ["pissa", "float32"], ["pissa", "bfloat16"]]
    assert rows[1][-2] == "4/4" and rows[1][5].endswith("x")
    assert float(rows[1][7]) == pytest.approx(float(rows[0][7]), rel=1e-4)  # the anchor's loss
    acc_bf16, acc_fp32, diff = float(bf16[0]), float(bf16[1]), float(bf16[2])
    assert acc_fp32 == float(rows[1][6]) and acc_bf16 == float(rows[2][6]) and diff == pytest.approx(acc_bf16 - acc_fp32)
    assert abs(diff) <= 2 * float(bf16[3]) + 1e-9 and re.fullmatch(r"[0-4]/4", bf16[4])
    assert float(bf16[6]) == pytest.approx(float(rows[2][7]) - float(rows[1][7]), abs=2e-6)
