"""Tests of pissa.data: the embedded Rotten Tomatoes data, user files, splits and error messages."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from pissa.data.datasets import REVIEW_TEMPLATE, Dataset, Example, Message, label_counts, load_dataset, split
from pissa.errors import PissaError


def _error(name_or_path: str | Path, **kwargs: Any) -> str:
    """The message of the PissaError raised by load_dataset, checked to be a single line."""
    with pytest.raises(PissaError) as info:
        load_dataset(str(name_or_path), **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- the embedded dataset -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotten() -> Dataset:
    return load_dataset("rotten_tomatoes")


def test_rotten_tomatoes_sizes_and_labels(rotten: Dataset) -> None:
    assert rotten.name == "rotten_tomatoes"
    assert rotten.labels == [" negative", " positive"]
    assert len(rotten.test) == 1000 and len(rotten.train) == 11_752  # 12,752 reviews after cleaning
    assert label_counts(rotten.train + rotten.test) == {"positive": 7368, "negative": 5384}
    for part in (rotten.train, rotten.test):
        assert 0.5 < label_counts(part)["positive"] / len(part) < 0.65


def test_rotten_tomatoes_format(rotten: Dataset) -> None:
    head, tail = REVIEW_TEMPLATE.split("{text}")
    for example in rotten.train + rotten.test:
        assert example.prompt.startswith(head) and example.prompt.endswith(tail)
        assert "\n" not in example.prompt[len(head) : -len(tail)]  # whitespace squashed
        assert example.completion in rotten.labels and example.completion == f" {example.label}"


def test_rotten_tomatoes_split_is_clean(rotten: Dataset) -> None:
    train = {e.prompt for e in rotten.train}
    test = {e.prompt for e in rotten.test}
    assert len(train) == len(rotten.train) and len(test) == len(rotten.test)  # no duplicates
    assert not train & test
    assert not any("Vijay Singh Rajput" in p for p in train | test)  # a 'plot' row (movie synopsis)


def test_rotten_tomatoes_split_is_deterministic(rotten: Dataset) -> None:
    again = load_dataset("rotten_tomatoes")
    assert again.train == rotten.train and again.test == rotten.test
    other = load_dataset("rotten_tomatoes", seed=1, test_size=200)
    assert len(other.test) == 200 and len(other.train) == 12_552
    assert {e.prompt for e in other.test} != {e.prompt for e in rotten.test[:200]}


# --- user files ---------------------------------------------------------------------------------


def test_jsonl_free_text(tmp_path: Path) -> None:
    records = [{"prompt": f"Q{i}:", "completion": f" A{i}", "id": i} for i in range(10)]
    records[3]["prompt"] = ""  # an empty prompt is allowed
    path = _jsonl(tmp_path / "d.jsonl", records)
    data = load_dataset(str(path), test_size=3)
    assert data.labels is None and data.name == str(path)
    assert len(data.train) == 7 and len(data.test) == 3
    assert sorted(data.train + data.test, key=lambda e: e.completion) == sorted(
        (Example(r["prompt"], r["completion"], None) for r in records), key=lambda e: e.completion
    )


def test_jsonl_classification(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "good\\nfilm", "label": 1}\n\n{"text": "bad", "label": 0}\n{"text": "ok", "label": 1}\n'
    )
    data = load_dataset(str(path), test_size=1)
    assert data.labels == [" 0", " 1"]
    examples = {e.prompt: e for e in data.train + data.test}
    assert examples["Text: good film\nLabel:"] == Example("Text: good film\nLabel:", " 1", "1")
    assert examples["Text: bad\nLabel:"].completion == " 0"


def test_csv_both_kinds(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text('text,label,extra\n"a, quoted\nline",pos,x\nplain,neg,y\n', encoding="utf-8")
    data = load_dataset(str(tmp_path / "c.csv"), test_size=1)
    assert data.labels == [" neg", " pos"]
    assert {e.prompt for e in data.train + data.test} == {"Text: a, quoted line\nLabel:", "Text: plain\nLabel:"}
    (tmp_path / "f.csv").write_text("\ufeffprompt,completion\nhi, there\n,x\n", encoding="utf-8")  # BOM
    free = load_dataset(str(tmp_path / "f.csv"), test_size=1)
    assert free.labels is None
    assert sorted((e.prompt, e.completion) for e in free.train + free.test) == [("", "x"), ("hi", " there")]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa  # a declared dependency (pissa[hf]): a broken install fails here
    import pyarrow.parquet as pq

    table = pa.table({"text": ["nice", "awful", "fine"], "label": ["pos", "neg", "pos"]})
    pq.write_table(table, tmp_path / "p.parquet")
    data = load_dataset(str(tmp_path / "p.parquet"), test_size=1)
    assert data.labels == [" neg", " pos"] and len(data.train) == 2
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [" c", " d"]}), tmp_path / "q.parquet")
    assert load_dataset(str(tmp_path / "q.parquet"), test_size=1).labels is None
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1.0, float("nan")]}), tmp_path / "nan.parquet")
    assert "column 'label'" in _error(tmp_path / "nan.parquet", test_size=1)


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert "pip install pyarrow" in _error(tmp_path / "p.parquet")


# --- bad input ----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.jsonl")
    assert "does not exist" in message and "rotten_tomatoes" in message
    assert "does not exist" in _error("rotten-tomatoes")  # a misspelt embedded name


def test_folder_and_extension(tmp_path: Path) -> None:
    assert "is a folder" in _error(tmp_path)
    (tmp_path / "d.txt").write_text("text,label\n")
    assert "unsupported data file type '.txt'" in _error(tmp_path / "d.txt")


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n\n{"text": "b", label: "y"}\n')
    assert "invalid JSON on line 3" in _error(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text('{"text": "a", "label": "x"}\n["b", "y"]\n')
    assert "line 2" in _error(tmp_path / "e.jsonl") and "not a JSON object" in _error(tmp_path / "e.jsonl")


EMPTY = [("e.jsonl", ""), ("b.jsonl", "\n \n"), ("e.csv", ""), ("h.csv", "text,label\n")]


@pytest.mark.parametrize("name,content", EMPTY)
def test_empty_files(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    assert "has no rows" in _error(tmp_path / name)


def test_unknown_columns(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "y": 1}, {"sentence": "b", "y": 0}])
    message = _error(path)
    assert "has columns sentence, y" in message and "prompt,completion" in message and "text,label" in message


def test_too_few_rows(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}])
    assert "only 1 row" in _error(path)


def test_single_class(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": " x "}])
    assert "single value 'x'" in _error(path, test_size=1)


@pytest.mark.parametrize("bad", [None, float("nan"), "  "])
def test_missing_labels(tmp_path: Path, bad: Any) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": bad}, {"text": "c", "label": "y"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes nan as NaN, which it reads back
    message = _error(path, test_size=1)
    assert "column 'label'" in message and "1 of 3 rows (first: line 2)" in message


def test_csv_empty_cell_and_extra_fields(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,\n")
    assert "column 'completion'" in _error(tmp_path / "d.csv", test_size=1)
    (tmp_path / "e.csv").write_text("text,label\ngood, fun film,pos\nbad,neg\n")
    assert "line 2" in _error(tmp_path / "e.csv") and "quote fields" in _error(tmp_path / "e.csv")


def test_nested_value(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": ["a"], "label": "x"}, {"text": "b", "label": "y"}])
    assert "holds a list" in _error(path, test_size=1)


def test_not_utf8_and_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes("text,label\ncaf\u00e9,x\nb,y\n".encode("latin-1"))
    assert "not UTF-8" in _error(tmp_path / "d.csv")
    (tmp_path / "p.parquet").write_bytes(b"not parquet at all")
    assert "not a readable parquet file" in _error(tmp_path / "p.parquet")


def test_bad_test_size(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    assert "leaves no training examples" in _error(path)  # default 1000 > 2 rows
    assert "0 or more" in _error(path, test_size=-1)
    assert len(load_dataset(str(path), test_size=0).train) == 2


# --- split --------------------------------------------------------------------------------------


def test_split_keeps_repeated_prompts_together() -> None:
    examples = [Example(f"p{i % 7}", f" c{i}", None) for i in range(70)]  # each prompt 10 times
    train, test = split(examples, test_size=15, seed=3)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len(test) == 20 and len(train) == 50  # 15 rounded up to whole groups
    assert sorted(train + test, key=lambda e: e.completion) == sorted(examples, key=lambda e: e.completion)
    again = split(list(reversed(examples)), test_size=15, seed=3)[1]
    assert set(again) == set(test)  # independent of file order


# --- chat rows, .json files and datasets folders --------------------------------------------------

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                  {"role": "assistant", "content": "#### 4"}], "id": 1},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7.\n#### 7"}]},
    {"messages": [{"role": "user", "content": "1 + 1?", "name": "ignored"}, {"role": "assistant", "content": "#### 2"}]},
]


def test_chat_rows(tmp_path: Path) -> None:
    data = load_dataset(str(_jsonl(tmp_path / "c.jsonl", CHAT)), test_size=1)
    assert data.labels is None and len(data.train) == 2 and len(data.test) == 1
    by_answer = {e.completion: e for e in data.train + data.test}
    multi = by_answer["3 + 4 = 7.\n#### 7"]  # the last assistant turn is the completion
    assert multi.label is None and multi.messages == (
        Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "3 + 4?"),
        Message("assistant", "3 + 4 = 7.\n#### 7"))
    assert json.loads(multi.prompt) == [["user", "Hi"], ["assistant", "Hello!"], ["user", "3 + 4?"]]  # the split key
    assert by_answer["#### 4"].messages[0] == Message("system", "Be brief.")


def test_chat_rows_in_json_parquet_and_csv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = {(e.prompt, e.completion) for e in load_dataset(str(_jsonl(tmp_path / "c.jsonl", CHAT)), test_size=0).train}
    (tmp_path / "c.json").write_text(json.dumps(CHAT))  # a JSON array
    pq.write_table(pa.Table.from_pylist(CHAT), tmp_path / "c.parquet")  # a list<struct> column
    with (tmp_path / "c.csv").open("w", newline="") as f:  # the list as JSON text in a cell
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerows([[json.dumps(r["messages"])] for r in CHAT])
    for name in ("c.json", "c.parquet", "c.csv"):
        assert {(e.prompt, e.completion) for e in load_dataset(str(tmp_path / name), test_size=0).train} == expected
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in CHAT))  # JSON Lines under .json
    assert len(load_dataset(str(tmp_path / "l.json"), test_size=0).train) == 3


def _turns(*roles: str) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": f"{r} says hi"} for r in roles]}


@pytest.mark.parametrize("row,message", [
    (_turns("system", "user"), "line 2 of '{}' has no assistant turn"),
    (_turns("user", "tool", "assistant"), "message 2 has the unknown role 'tool'; roles must be system, user, assistant"),
    (_turns("user", "assistant", "user"), "ends with a user turn"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "message 1 must be an object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "assistant message 2 is empty"),
])
def test_bad_chat_rows(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [CHAT[0], row])
    assert message.format(path) in _error(path, test_size=1)


def test_bad_json_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"data": [{"text": "a", "label": "x"}]}')
    assert "JSON array of objects" in _error(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[1, 2]")
    assert "JSON array of objects" in _error(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("[{")
    assert "not valid JSON" in _error(tmp_path / "c.json")


def _save_to_disk(folder: Path, records: list[dict[str, Any]], shards: int = 1, features: dict | None = None) -> Path:
    """The layout ``datasets.Dataset.save_to_disk`` writes (read without the package): Arrow stream files
    ``data-0000i-of-0000n.arrow``, ``state.json`` listing them under ``_data_files``, ``dataset_info.json``."""
    import pyarrow as pa

    folder.mkdir()
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    table, size = pa.Table.from_pylist(records), -(-len(records) // shards)  # one schema, contiguous shards
    for i, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * size, size))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": features or {}}))
    return folder


def test_datasets_save_to_disk_folders(tmp_path: Path) -> None:
    chat = load_dataset(str(_save_to_disk(tmp_path / "chat", CHAT, shards=2)), test_size=0)
    assert sorted(e.completion for e in chat.train) == ["#### 2", "#### 4", "3 + 4 = 7.\n#### 7"]
    rows = [{"text": "nice", "label": 1}, {"text": "awful", "label": 0}, {"text": "fine", "label": 1}]
    features = {"text": {"dtype": "string", "_type": "Value"}, "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}}
    labelled = load_dataset(str(_save_to_disk(tmp_path / "cls", rows, features=features)), test_size=1)
    assert labelled.labels == [" neg", " pos"]  # ClassLabel integers read as their names
    assert {e.prompt: e.label for e in labelled.train + labelled.test}["Text: awful\nLabel:"] == "neg"
    plain = load_dataset(str(_save_to_disk(tmp_path / "ints", rows)), test_size=1)
    assert plain.labels == [" 0", " 1"]


def test_bad_datasets_folders(tmp_path: Path) -> None:
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    message = _error(tmp_path / "dd")  # the train split is read, and its folder is missing
    assert f"'{tmp_path / 'dd' / 'train'}' is a folder without state.json" in message
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"no": "splits"}')
    assert "unreadable dataset_dict.json" in _error(tmp_path / "dd")
    broken = _save_to_disk(tmp_path / "broken", CHAT)
    (broken / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    assert "not a readable datasets save_to_disk folder" in _error(broken)
    (broken / "state.json").write_text('{"_data_files": [{"filename": "missing.arrow"}]}')
    assert "not a readable datasets save_to_disk folder" in _error(broken)
