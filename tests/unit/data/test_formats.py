"""Tests of pissa.data.formats and pissa.data.readers: Alpaca, ShareGPT, `columns`, datasets folders (Dataset and
DatasetDict, written by datasets itself) and Hub datasets in a local datasets cache; each error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pissa.data.datasets import Message, load_dataset
from pissa.data.formats import FORMATS, detect, parse_columns
from pissa.errors import PissaError


def _error(name: str | Path, **kwargs: Any) -> str:
    """The one-line message of the PissaError load_dataset raises."""
    with pytest.raises(PissaError) as info:
        load_dataset(str(name), test_size=0, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _full(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with every key in each (None where missing): Arrow writers take the schema from the first row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def _conversations(path: Path, **kwargs: Any) -> dict[tuple[Message, ...], str]:
    """Every example of ``path`` (test_size 0) as ``{messages: completion}``."""
    data = load_dataset(str(path), test_size=0, **kwargs)
    assert data.labels is None and all(e.label is None for e in data.train)
    return {e.messages: e.completion for e in data.train if e.messages is not None}


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
    {"instruction": "And now 4 + 4?", "output": "8", "history": [["2 + 2?", "4"], ["3 + 3?", "6"]]},
]


def test_alpaca_rows_become_conversations(tmp_path: Path) -> None:
    got = _conversations(_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert got == {
        (Message("user", "Add the numbers.\n\n2 and 3"), Message("assistant", "5")): "5",
        (Message("system", "Be brief."), Message("user", "Say hi."), Message("assistant", "Hi!")): "Hi!",
        (Message("user", "2 + 2?"), Message("assistant", "4"), Message("user", "3 + 3?"), Message("assistant", "6"),
         Message("user", "And now 4 + 4?"), Message("assistant", "8")): "8",
    }


def test_alpaca_in_json_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = _conversations(_jsonl(tmp_path / "a.jsonl", ALPACA))
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    pq.write_table(pa.Table.from_pylist(_full(ALPACA)), tmp_path / "a.parquet")
    assert _conversations(tmp_path / "a.json") == expected
    assert _conversations(tmp_path / "a.parquet") == expected


SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hello"},
                       {"from": "gpt", "value": "Hi there."}]},
    {"conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"},
                       {"from": "user", "value": "and 3 + 3?"}, {"from": "chatgpt", "value": "6"}],
     "system": "Answer with a number.", "id": "x"},
]


def test_sharegpt_rows_become_conversations(tmp_path: Path) -> None:
    got = _conversations(_jsonl(tmp_path / "s.jsonl", SHAREGPT))
    assert got == {
        (Message("system", "Be kind."), Message("user", "Hello"), Message("assistant", "Hi there.")): "Hi there.",
        (Message("system", "Answer with a number."), Message("user", "2 + 2?"), Message("assistant", "4"),
         Message("user", "and 3 + 3?"), Message("assistant", "6")): "6",
    }
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_full(SHAREGPT)), tmp_path / "s.parquet")
    (tmp_path / "s.json").write_text(json.dumps(SHAREGPT))
    assert _conversations(tmp_path / "s.parquet") == got == _conversations(tmp_path / "s.json")


def test_sharegpt_turns_under_messages_and_role_content_under_conversations(tmp_path: Path) -> None:
    mixed = [{"messages": SHAREGPT[0]["conversations"]},  # from/value turns in a messages column
             {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]}]
    assert list(_conversations(_jsonl(tmp_path / "m.jsonl", mixed)).values()) == ["Hi there.", "Hi there."]
    openai = [{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]}
              for i in range(2)]
    assert sorted(_conversations(_jsonl(tmp_path / "o.jsonl", openai)).values()) == ["a0", "a1"]


def test_columns_rename_before_detection(tmp_path: Path) -> None:
    rows = [{"question": f"Q{i}?", "answer": f" A{i}", "prompt": "ignored"} for i in range(3)]
    data = load_dataset(str(_jsonl(tmp_path / "q.jsonl", rows)), test_size=0,
                        columns=["prompt=question", "completion=answer"])
    assert sorted((e.prompt, e.completion) for e in data.train) == [("Q0?", " A0"), ("Q1?", " A1"), ("Q2?", " A2")]
    alpaca = [{"task": "Say hi.", "reply": "Hi!"}, {"task": "Say bye.", "reply": "Bye!"}]
    got = _conversations(_jsonl(tmp_path / "t.jsonl", alpaca), columns=["instruction=task", "output=reply"])
    assert sorted(got.values()) == ["Bye!", "Hi!"]
    assert parse_columns([" prompt = q "]) == {"prompt": "q"}


@pytest.mark.parametrize("items,message", [
    (["prompt"], "`columns` item 'prompt' must be TARGET=SOURCE"),
    (["=q"], "must be TARGET=SOURCE"),
    (["question=prompt"], "`columns` maps to 'question', which no format reads"),
    (["prompt=a", "prompt=b"], "`columns` maps 'prompt' twice"),
    (["prompt=nope", "completion=answer"], "`columns` names 'nope', which"),
])
def test_bad_columns(tmp_path: Path, items: list[str], message: str) -> None:
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}] * 2)
    assert message in _error(path, columns=items)


def test_unknown_columns_suggest_the_formats_and_columns(tmp_path: Path) -> None:
    message = _error(_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}] * 2))
    assert "has columns question, answer" in message and "instruction,output (alpaca)" in message
    assert "conversations (sharegpt)" in message and "`columns`" in message
    assert [f.name for f in FORMATS][:3] == ["chat", "sharegpt", "alpaca"]
    assert detect(["prompt", "completion", "text", "label"], "x").name == "prompt-completion"  # first match wins


def _sharegpt(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


@pytest.mark.parametrize("row,message", [
    ({"instruction": "q"}, "has columns instruction"),  # on its own a row without output: no format
    ({"instruction": "", "output": "a"}, "line 2 of '{}': column 'instruction' is empty"),
    ({"instruction": "q", "output": " "}, "line 2 of '{}': column 'output' is empty"),
    ({"instruction": "q", "output": 3}, "line 2 of '{}': column 'output' holds a int"),
    ({"instruction": "q", "output": "a", "history": "nope"}, "line 2 of '{}': 'history' must be a list"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "'history' must be a list of [instruction, response]"),
    ({"instruction": "q", "output": "a", "history": [["u", 5]]}, "line 2 of '{}': message 2 must be an object"),
    ({"instruction": "q", "output": "a", "system": ["x"]}, "column 'system' holds a list"),
])
def test_bad_alpaca_rows_name_their_line(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [ALPACA[0], row, ALPACA[1]] if "output" in row else [row, row])
    assert message.format(path) in _error(path)


@pytest.mark.parametrize("row,message", [
    (_sharegpt(("human", "hi")), "line 2 of '{}' has no assistant turn"),
    (_sharegpt(("human", "hi"), ("gpt", "yo"), ("human", "and?")), "line 2 of '{}' ends with a user turn"),
    (_sharegpt(("human", "hi"), ("observation", "x"), ("gpt", "y")), "message 2 has the unknown role 'observation'"),
    (_sharegpt(("human", "hi"), ("gpt", "")), "line 2 of '{}': assistant message 2 is empty"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "line 2 of '{}': message 1 must be an object"),
    ({"conversations": []}, "line 2 of '{}': 'conversations' must be a non-empty list"),
])
def test_bad_sharegpt_rows_name_their_line(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [SHAREGPT[0], row])
    assert message.format(path) in _error(path)


def test_bad_rows_of_a_json_array_name_their_row(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps([SHAREGPT[0], SHAREGPT[1], _sharegpt(("human", "hi"))]))
    assert f"row 3 of '{path}' has no assistant turn" in _error(path)


# --- datasets folders and the local datasets cache -----------------------------------------------


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(_full(ALPACA)).save_to_disk(str(tmp_path / "one"))
    expected = _conversations(_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert _conversations(tmp_path / "one") == expected
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_full(ALPACA)),
                               "test": datasets.Dataset.from_list(_full(SHAREGPT))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _conversations(tmp_path / "dd") == expected  # train by default
    assert _conversations(tmp_path / "dd", split_name="test") == _conversations(_jsonl(tmp_path / "s.jsonl", SHAREGPT))
    message = _error(tmp_path / "dd", split_name="validation")
    assert "`data_split` 'validation' is not a split of" in message and "(it has train, test)" in message
    datasets.DatasetDict({"a": dd["train"], "b": dd["test"]}).save_to_disk(str(tmp_path / "ab"))
    assert "has the splits a, b and none is train; pick one with `data_split`" in _error(tmp_path / "ab")
    datasets.DatasetDict({"only": dd["test"]}).save_to_disk(str(tmp_path / "only"))
    assert len(_conversations(tmp_path / "only")) == 2  # the only split


def _cache_hub_dataset(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Prepare ``files`` into ``cache`` as ``datasets.load_dataset(repo_id)`` does for a Hub dataset (same folder
    layout, offline: the json builder with the Hub dataset's name, config ``default``)."""
    from datasets.packaged_modules.json.json import Json

    builder = Json(cache_dir=str(cache), dataset_name=repo_id.split("/")[-1], config_id="default",
                   data_files={k: str(v) for k, v in files.items()}, hash="0123abcd")
    builder.repo_id = repo_id  # the Hub id names the folder (owner___name); set after the local-files check
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()


def test_a_hub_dataset_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = _jsonl(tmp_path / "a.jsonl", _full(ALPACA))
    test = _jsonl(tmp_path / "b.jsonl", _full([{**r, "output": r["output"] + "!"} for r in ALPACA]))  # one schema
    _cache_hub_dataset(cache, "someone/TinyChat", {"train": train, "test": test})
    assert (cache / "someone___tiny_chat").is_dir()  # datasets' own snake-cased name
    assert datasets.load_dataset("someone/TinyChat", cache_dir=str(cache), split="test").num_rows == 3  # datasets agrees
    assert _conversations(Path("someone/TinyChat")) == _conversations(train)
    assert _conversations(Path("someone/TinyChat"), split_name="test") == _conversations(test)
    assert "`data_split` 'dev' is not a split of 'someone/TinyChat'" in _error("someone/TinyChat", split_name="dev")
    message = _error("someone/absent")
    assert "does not exist" in message and str(cache / "someone___absent") in message
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone").mkdir()
    _jsonl(tmp_path / "someone" / "TinyChat", [{"prompt": "p", "completion": "c"}] * 2)
    assert "unsupported data file type" in _error("someone/TinyChat")  # a local path wins over the cache
