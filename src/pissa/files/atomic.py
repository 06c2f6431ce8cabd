"""Outputs that appear whole or not at all: a folder or a file is written beside its destination, then renamed into place.

    atomic_dir(OUT)        a fresh folder ``.OUT.tmp-XXXX`` next to OUT; renamed to OUT on success, removed on failure
    atomic_file(OUT)       the same for one file (``.OUT.tmp-XXXX.SUFFIX``); atomic_write_text writes text through it
    publish_dir(WORK, OUT) the last step of both, for a work folder the caller keeps itself (a resumable run's)

"Failure" is any exception raised inside the block, KeyboardInterrupt included: the destination is then left as
it was and the temporary sibling is gone. Only a killed process (SIGKILL, power loss) leaves a ``.OUT.tmp-*``
sibling behind, never a half-written OUT. What appears gets the modes a plain ``mkdir`` / ``open`` would give
(0777 / 0666 less the umask), not the owner-only ones of mkdtemp / mkstemp.

Resumable work folders (``pissa finetune``'s ``OUT.partial``, ``pissa init``'s ``.OUT.tmp-init``) are kept by
their callers, which alone know what is worth resuming; both end with :func:`publish_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pissa.errors import PissaError


def _umask_mode(mode: int) -> int:
    """``mode`` with the process umask applied (mkdtemp/mkstemp create private 0700/0600 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _refuse(path: Path) -> PissaError:
    return PissaError(f"{path} already exists; choose a new output folder or remove it")


def publish_dir(src: Path, dst: Path, *, exist_ok: bool = True) -> None:
    """Rename the finished folder ``src`` to ``dst``.

    An existing ``dst`` is replaced (``exist_ok``; it is moved to a ``.DST.old-XXXX`` sibling first and deleted
    once ``src`` is in place; should that rename fail it is moved back) or refused (``exist_ok=False``:
    PissaError "DST already exists", ``src`` left where it is).
    """
    if not (dst.exists() or dst.is_symlink()):
        os.replace(src, dst)
        return
    if not exist_ok:
        raise _refuse(dst)
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, exist_ok: bool = True) -> Iterator[Path]:
    """Yield a fresh empty folder ``.NAME.tmp-XXXX`` next to ``path`` (its parents are created) that becomes
    ``path`` when the block succeeds (:func:`publish_dir`); on failure it is removed and ``path`` left as it was.

    ``exist_ok=False``: an existing ``path`` is refused (PissaError "PATH already exists"), before the block
    and again before the rename (nothing is replaced; the temporary folder is removed).
    """
    path = Path(path)
    if not exist_ok and (path.exists() or path.is_symlink()):
        raise _refuse(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, _umask_mode(0o777))
        yield tmp
        publish_dir(tmp, path, exist_ok=exist_ok)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path of a fresh empty file ``.NAME.tmp-XXXX.SUFFIX`` next to ``path`` (its parents are created;
    ``path``'s suffix kept, so writers that go by the extension, such as matplotlib, pick the right format).
    When the block succeeds it gets mode 0666 less the umask and replaces ``path``; on failure it is removed
    and ``path`` left as it was. The block may write it in place or replace it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write the text file ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
