"""files/atomic.py: a destination appears whole on success and stays as it was on failure, with no temporary sibling left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pissa.errors import PissaError
from pissa.files.atomic import atomic_dir, atomic_file, atomic_write_text, publish_dir


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_dir_appears_on_success_and_replaces_an_older_one(tmp_path) -> None:
    out = tmp_path / "deep" / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.tmp-") and names(tmp) == []
        (tmp / "a").write_text("1")
        assert not out.exists()
    assert names(out) == ["a"] and names(out.parent) == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert names(out) == ["b"] and names(out.parent) == ["out"]  # replaced whole, the old one deleted


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_atomic_dir_leaves_the_destination_as_it_was(tmp_path, error) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(type(error)), atomic_dir(out) as tmp:
        (tmp / "a").write_text("new")
        raise error
    assert names(tmp_path) == ["out"] and (out / "a").read_text() == "old"
    with pytest.raises(type(error)), atomic_dir(tmp_path / "fresh"):
        raise error
    assert names(tmp_path) == ["out"]


def test_atomic_dir_without_exist_ok_refuses_an_existing_destination(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(PissaError, match="out already exists; choose a new output folder or remove it"), \
            atomic_dir(out, exist_ok=False):
        pytest.fail("the block must not run")
    with pytest.raises(PissaError, match="already exists"), atomic_dir(tmp_path / "new", exist_ok=False) as tmp:
        (tmp / "a").write_text("1")
        (tmp_path / "new").mkdir()  # appeared while writing: not replaced
    assert names(tmp_path) == ["new", "out"] and names(tmp_path / "new") == [] and names(out) == ["keep"]
    with atomic_dir(tmp_path / "third", exist_ok=False) as tmp:
        (tmp / "a").write_text("1")
    assert names(tmp_path / "third") == ["a"]


def test_publish_dir_replaces_or_refuses(tmp_path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "new").write_text("n")
    (dst / "old").write_text("o")
    with pytest.raises(PissaError, match="dst already exists"):
        publish_dir(src, dst, exist_ok=False)
    assert names(src) == ["new"] and names(dst) == ["old"]
    publish_dir(src, dst)
    assert names(tmp_path) == ["dst"] and names(dst) == ["new"]


def test_failed_rename_puts_the_older_destination_back(tmp_path, monkeypatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (dst / "old").write_text("o")
    real = os.replace

    def fails_on_src(a, b):
        if Path(a) == src:
            raise OSError("no space")
        real(a, b)

    monkeypatch.setattr(os, "replace", fails_on_src)
    with pytest.raises(OSError, match="no space"):
        publish_dir(src, dst)
    assert names(tmp_path) == ["dst", "src"] and names(dst) == ["old"]


def test_atomic_file_replaces_on_success_keeping_the_suffix(tmp_path) -> None:
    out = tmp_path / "sub" / "plot.png"
    with atomic_file(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".plot.png.tmp-") and tmp.suffix == ".png"
        tmp.write_bytes(b"one")
        assert not out.exists()
    assert out.read_bytes() == b"one" and names(out.parent) == ["plot.png"]
    with atomic_file(out) as tmp:
        tmp.unlink()  # a writer may replace the file
        tmp.write_bytes(b"two")
    assert out.read_bytes() == b"two" and names(out.parent) == ["plot.png"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_atomic_file_leaves_the_destination_as_it_was(tmp_path, error) -> None:
    out = tmp_path / "stats.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise error
    assert names(tmp_path) == ["stats.safetensors"] and out.read_bytes() == b"old"
    with pytest.raises(type(error)), atomic_file(tmp_path / "new.txt"):
        raise error
    assert names(tmp_path) == ["stats.safetensors"]


def test_atomic_write_text(tmp_path) -> None:
    atomic_write_text(tmp_path / "m.json", "{}")
    atomic_write_text(tmp_path / "m.json", "[]")
    assert (tmp_path / "m.json").read_text() == "[]" and names(tmp_path) == ["m.json"]


def test_modes_follow_the_umask_not_mkdtemp(tmp_path, umask_022) -> None:
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    with atomic_file(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"x")
    atomic_write_text(tmp_path / "t.txt", "x")
    assert mode(tmp_path / "d") == 0o755
    assert mode(tmp_path / "f.bin") == 0o644 and mode(tmp_path / "t.txt") == 0o644
    os.umask(0o077)
    with atomic_dir(tmp_path / "private") as tmp:
        pass
    atomic_write_text(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private") == 0o700 and mode(tmp_path / "private.txt") == 0o600
