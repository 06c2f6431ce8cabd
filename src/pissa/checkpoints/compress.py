"""``pissa compress``: WeLore's non-uniform low-rank compression of a safetensors checkpoint, streamed.

    OUT/model.safetensors   every tensor of the input, but each low-rank-capable target W (out, in) replaced by
                            ``{layer}.A (r, in)`` and ``{layer}.B (out, r)`` with ``B A`` its best rank-r
                            approximation (``A = sqrt(S_r) V_r^T``, ``B = U_r sqrt(S_r)``), in W's dtype
    OUT/welore.json         the per-layer shapes and ranks (None: kept dense), τ, the requested and reached
                            reduction (:class:`~pissa.adapter.compressed.Record`)
    OUT/config.json, tokenizer files ...   copied

:func:`pissa.load_compressed` loads it back. How: pass 1 reads each target alone (plain reads into one reused
buffer, :class:`~pissa.files.safetensors.Reader`) and keeps its singular values (a vector per matrix); the plan
(:func:`~pissa.methods.welore.welore_plan`) follows from them alone; pass 2 reads each LRCM again and writes its
factors to a record file; last, OUT/model.safetensors is assembled by copying bytes (the dense tensors from the
input shards, the factors from the records). Peak memory is one target, its float32 copy and its SVD.

Resumable: work happens in ``.OUT.tmp-compress`` next to OUT (``job.json`` the request; ``spectra.safetensors``
once pass 1 is done; ``state/LAYER.safetensors`` per LRCM, renamed into place when whole). A rerun of the same
command keeps what is there; another request starts afresh. The finished folder is renamed to OUT in one step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pissa.adapter.compressed import RECORD, Record, factorize, plan_for, spectrum
from pissa.checkpoints.folder import Checkpoint, copy_other_files, open_checkpoint
from pissa.checkpoints.init import DECOMPOSABLE, Target, resolve_targets
from pissa.errors import PissaError
from pissa.files.atomic import publish_dir
from pissa.files.safetensors import Entry, Reader, shard_entries, write_safetensors
from pissa.methods.welore import check_request
from pissa.runtime import hub

OUTPUT = "model.safetensors"


def _check(ckpt: Checkpoint, targets: list[Target]) -> None:
    for t in targets:
        e = ckpt.entries[t.key]
        if t.conv1d or e.dtype not in DECOMPOSABLE or len(e.shape) != 2:
            raise PissaError(f"{t.key} ({e.dtype} {list(e.shape)}{', Conv1D' if t.conv1d else ''}) is not an nn.Linear "
                             "float matrix; compress replaces Linear layers: drop it from `targets`")


def _weight(ckpt: Checkpoint, t: Target, reader: Reader, device: torch.device | None) -> torch.Tensor:
    entry = ckpt.entries[t.key]
    with open(ckpt.root / entry.shard, "rb", buffering=0) as f:
        return reader.tensor(f, entry).to(device)


def _spectra(ckpt: Checkpoint, targets: list[Target], path: Path, reader: Reader, device: torch.device | None,
             progress: bool) -> list[torch.Tensor]:
    """Every target's singular values (pass 1), kept in ``path`` for a resume."""
    if not path.is_file():
        found = {t.name: spectrum(_weight(ckpt, t, reader, device)).cpu()
                 for t in tqdm(targets, desc="spectra", unit="matrix", disable=not progress)}
        save_file(found, str(path.with_suffix(".partial")))
        os.replace(path.with_suffix(".partial"), path)
    saved = load_file(str(path))
    return [saved[t.name] for t in targets]


def _prepare(work: Path, job: dict[str, object]) -> None:
    """Keep ``work`` if it belongs to the same job, else start it afresh."""
    job_file = work / "job.json"
    if job_file.is_file() and json.loads(job_file.read_text()) == job:
        return
    if work.exists():
        shutil.rmtree(work)
    (work / "state").mkdir(parents=True)
    job_file.write_text(json.dumps(job))


def compress_checkpoint(model: str, out: str | os.PathLike, reduction: float, targets: str | list[str] = "all-linear", *,
                        uniform: bool = False, progress: bool = True, device: torch.device | None = None) -> Record:
    """Write the compressed checkpoint of ``model`` (embedded name or folder) to the new folder ``out`` (see the
    module docstring); returns its :class:`~pissa.adapter.compressed.Record`. ``uniform``: the baseline plan."""
    out = Path(out)
    if out.exists():
        raise PissaError(f"{out} already exists; choose a new output folder or remove it")
    ckpt = open_checkpoint(hub.resolve_model(model))
    found = resolve_targets(ckpt, targets)
    _check(ckpt, found)
    shapes = [(ckpt.entries[t.key].shape[0], ckpt.entries[t.key].shape[1]) for t in found]
    check_request(shapes, reduction)
    work = out.parent / f".{out.name}.tmp-compress"
    out.parent.mkdir(parents=True, exist_ok=True)
    _prepare(work, {"model": str(ckpt.root), "reduction": reduction, "targets": targets, "uniform": uniform})
    reader = Reader()
    spectra = [] if uniform else _spectra(ckpt, found, work / "spectra.safetensors", reader, device, progress)
    plan = plan_for(spectra, shapes, reduction, uniform)
    lrcms = [(t, r) for t, r in zip(found, plan.ranks, strict=True) if r is not None]
    for t, rank in tqdm(lrcms, desc="factors", unit="matrix", disable=not progress):
        record = work / "state" / f"{t.name}.safetensors"
        if not record.is_file():
            A, B = factorize(_weight(ckpt, t, reader, device), rank)
            save_file({f"{t.name}.A": A.cpu(), f"{t.name}.B": B.cpu()}, str(record.with_suffix(".partial")))
            os.replace(record.with_suffix(".partial"), record)
    replaced = {t.key for t, _ in lrcms}
    parts: list[tuple[Path, list[tuple[str, Entry]]]] = [
        (ckpt.root / shard, sorted(((k, e) for k, e in ckpt.entries.items() if e.shard == shard and k not in replaced),
                                   key=lambda ke: ke[1].start))
        for shard in ckpt.shards
    ]
    for t, _ in lrcms:
        record = work / "state" / f"{t.name}.safetensors"
        parts.append((record, sorted(shard_entries(record).items(), key=lambda ke: ke[1].start)))
    write_safetensors(work / OUTPUT, parts, {"format": "pt"}, reader)
    copy_other_files(ckpt.root, work)
    if ckpt.index is not None:
        (work / ckpt.index).unlink(missing_ok=True)  # the output is one file
    result = Record.of([t.name for t in found], shapes, plan, "uniform" if uniform else "welore")
    (work / RECORD).write_text(result.to_json())
    shutil.rmtree(work / "state")
    for name in ("spectra.safetensors", "job.json"):
        (work / name).unlink(missing_ok=True)
    publish_dir(work, out, exist_ok=False)
    return result
