"""User data on disk as raw records: files, ``datasets`` folders and the local datasets cache.

Every reader returns ``(columns, rows)``: the column names (every key seen, in order) and each record with
where it is (``"line 3"`` of a .jsonl or .csv file, ``"row 3"`` of a .json array, a parquet file or an Arrow
table), so that an error names the place. What the columns mean is :mod:`pissa.data.formats`' business.

- ``.jsonl``: one JSON object a line (blank lines skipped); ``.json``: an array of objects, or one object a
  line; ``.csv``: UTF-8 with a header, every cell text; ``.parquet``: read with pyarrow.
- a folder written by ``datasets``' ``save_to_disk``: a ``Dataset`` (``state.json`` listing Arrow stream files)
  or a ``DatasetDict`` (``dataset_dict.json`` and one such folder a split; ``split`` picks one).
- a Hugging Face Hub dataset name (``owner/name`` or ``name``) that ``datasets.load_dataset`` already prepared
  in the local cache (``$HF_DATASETS_CACHE``, default ``$HF_HOME/datasets``): the newest
  ``{owner}___{name}/{config}/{version}/{hash}/`` folder, its ``{name}-{split}[-NNNNN-of-NNNNN].arrow`` files.
  Nothing is downloaded (the same entries ``load_dataset`` reads with ``HF_HUB_OFFLINE=1``).

Arrow data is read with pyarrow alone (the ``datasets`` package is not needed); integer ``ClassLabel``
columns read as their names (from ``dataset_info.json``).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

from pissa.errors import PissaError

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
Row = tuple[str, dict[str, Any]]
"""A raw record and where it is in its file ("line 3", "row 3"), for error messages."""
Table = tuple[list[str], list[Row]]
"""``(columns, rows)`` of a data source."""


def read_path(path: Path, name: str, split: str | None = None) -> Table:
    """The records of an existing file or ``save_to_disk`` folder ``path`` (``name``: how the user wrote it)."""
    if path.is_dir():
        return read_saved_dataset(path, name, split)
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise PissaError(f"unsupported data file type '{suffix or path.name}' in '{name}'; use {', '.join(FILE_TYPES)}")
    reader = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}[suffix]
    try:
        return reader(path, name)
    except UnicodeDecodeError:
        raise PissaError(f"'{name}' is not UTF-8 text; save it as UTF-8") from None


def read_jsonl(path: Path, name: str) -> Table:
    """One JSON object per line; blank lines are skipped."""
    columns: dict[str, None] = {}
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"invalid JSON on line {number} of '{name}' ({err.msg}); each line must be a JSON object"
                raise PissaError(msg) from None
            if not isinstance(record, dict):
                msg = f"line {number} of '{name}' is not a JSON object; each line must be one, like {{...}}"
                raise PissaError(msg)
            columns.update(dict.fromkeys(record))
            rows.append((f"line {number}", record))
    return list(columns), rows


def read_json(path: Path, name: str) -> Table:
    """A JSON array of objects (rows named "row N"), or JSON Lines under a .json name."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        if text.lstrip().startswith("{"):  # one object a line, as datasets' json loader also reads
            return read_jsonl(path, name)
        raise PissaError(f"'{name}' is not valid JSON; a .json file must hold an array of objects or one object a line") \
            from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise PissaError(f"'{name}' must hold a JSON array of objects, like [{{...}}, {{...}}]")
    return _numbered(records)


def read_csv(path: Path, name: str) -> Table:
    """A UTF-8 CSV file with a header line; every cell is read as text."""
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            columns = list(reader.fieldnames or [])
            for record in reader:
                where = f"line {reader.line_num}"
                if None in record:
                    raise PissaError(
                        f"{where} of '{name}' has more fields than the header ({len(columns)}); "
                        "quote fields that contain commas"
                    )
                rows.append((where, record))
        except csv.Error as err:
            raise PissaError(f"malformed CSV at line {reader.line_num} of '{name}' ({err})") from None
    return columns, rows


def read_parquet(path: Path, name: str) -> Table:
    """A parquet file, read with pyarrow."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise PissaError("reading .parquet files needs pyarrow; run: pip install pyarrow") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise PissaError(f"'{name}' is not a readable parquet file ({str(err).splitlines()[0]})") from None
    return _numbered(table.to_pylist(), table.column_names)


def read_saved_dataset(path: Path, name: str, split: str | None = None) -> Table:
    """A folder written by ``save_to_disk``: a ``Dataset`` (``state.json`` lists its Arrow stream files,
    ``_data_files``, read in order) or a ``DatasetDict`` (``dataset_dict.json``; the split ``split``, by default
    ``train`` or the only one)."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text())["splits"]]
        except (ValueError, KeyError, TypeError):
            raise PissaError(f"'{name}' has an unreadable dataset_dict.json; save the DatasetDict again") from None
        chosen = pick_split(splits, split, name)
        return read_saved_dataset(path / chosen, str(Path(name) / chosen))
    if not (path / "state.json").is_file():
        raise PissaError(f"data path '{name}' is a folder without state.json; pass a {', '.join(FILE_TYPES)} file "
                         "or a folder written by datasets' save_to_disk")
    try:
        files = [path / str(entry["filename"]) for entry in json.loads((path / "state.json").read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise PissaError(f"'{name}' is not a readable datasets save_to_disk folder ({_detail(err)})") from None
    return read_arrow(files, path / "dataset_info.json", f"'{name}' is not a readable datasets save_to_disk folder")


def pick_split(splits: list[str], split: str | None, name: str) -> str:
    """``split`` if ``name`` has it, else (None) ``train`` or the only split; PissaError naming `data_split`."""
    if split is None:
        if "train" in splits or len(splits) == 1:
            return "train" if "train" in splits else splits[0]
        raise PissaError(f"'{name}' has the splits {', '.join(splits)} and none is train; pick one with `data_split`")
    if split not in splits:
        raise PissaError(f"`data_split` '{split}' is not a split of '{name}' (it has {', '.join(splits) or 'none'})")
    return split


def read_arrow(files: list[Path], info_file: Path, failure: str) -> Table:
    """Arrow stream files (``datasets``' own format) as one table; ``info_file``: their ``dataset_info.json``
    (ClassLabel names); ``failure``: the start of the error message when they cannot be read."""
    pyarrow = _pyarrow()
    try:
        tables = []
        for file in files:
            with pyarrow.memory_map(str(file)) as source:
                tables.append(pyarrow.ipc.open_stream(source).read_all())
        table = pyarrow.concat_tables(tables) if len(tables) > 1 else tables[0]
        features = (json.loads(info_file.read_text()).get("features") or {}) if info_file.is_file() else {}
    except (ValueError, KeyError, TypeError, IndexError, OSError, pyarrow.ArrowException) as err:
        raise PissaError(f"{failure} ({_detail(err)})") from None
    records = table.to_pylist()
    for column, feature in features.items() if isinstance(features, dict) else ():
        names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
        if names and column in table.column_names:
            for record in records:
                value = record[column]
                if isinstance(value, int) and 0 <= value < len(names):
                    record[column] = names[value]
    return _numbered(records, table.column_names)


HUB_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
"""What a Hub dataset id looks like: ``name`` or ``owner/name``."""


def datasets_cache() -> Path:
    """The ``datasets`` cache folder: ``$HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``, else
    ``$XDG_CACHE_HOME/huggingface/datasets`` (``~/.cache`` by default)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "datasets"


def cache_entry(repo_id: str) -> Path:
    """Where ``datasets`` keeps the prepared data of Hub dataset ``repo_id`` (``owner/name`` -> ``owner___name``,
    the name in snake case, as datasets' own ``camelcase_to_snakecase``)."""
    *owner, name = repo_id.split("/")
    snake = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z\d])", r"\1_\2", name)).lower()
    return datasets_cache() / "___".join([*owner, snake])


def read_cached_hub_dataset(repo_id: str, split: str | None = None) -> Table | None:
    """The split ``split`` (default train, or the only one) of the newest prepared copy of Hub dataset
    ``repo_id`` in the local datasets cache; None when the cache holds none."""
    root = cache_entry(repo_id)
    versions = [d for d in root.glob("*/*/*") if (d / "dataset_info.json").is_file()] if HUB_NAME.match(repo_id) else []
    if not versions:
        return None
    folder = max(versions, key=lambda d: (d / "dataset_info.json").stat().st_mtime)
    try:
        info = json.loads((folder / "dataset_info.json").read_text())
        splits = {str(s): dict(v) for s, v in (info.get("splits") or {}).items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise PissaError(f"the cached dataset {folder} has an unreadable dataset_info.json ({_detail(err)})") from None
    chosen = pick_split(list(splits), split, repo_id)
    files = sorted(folder.glob(f"*-{chosen}.arrow")) or sorted(folder.glob(f"*-{chosen}-[0-9]*-of-[0-9]*.arrow"))
    if not files:
        raise PissaError(f"the cached dataset {folder} lacks the Arrow files of split {chosen}; load it again with datasets")
    return read_arrow(files, folder / "dataset_info.json", f"the cached dataset {folder} is not readable")


def _numbered(records: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    """Records named "row 1", "row 2", ...; columns: the given ones, else every key seen, in order."""
    if columns is None:
        seen: dict[str, None] = {}
        for record in records:
            seen.update(dict.fromkeys(record))
        columns = list(seen)
    return columns, [(f"row {i + 1}", record) for i, record in enumerate(records)]


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
    except ImportError:
        raise PissaError("reading a datasets folder needs pyarrow; run: pip install pyarrow") from None
    return pyarrow


def _detail(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
