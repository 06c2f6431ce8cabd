"""The embedded arithmetic task: deterministic, well-formed, and every worked answer is right."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from pissa.data.answers import extract_answer
from pissa.data.datasets import load_dataset
from pissa.data.tasks import ARITHMETIC_SIZE, arithmetic_problem, arithmetic_problems, arithmetic_rows

LINE = re.compile(r"^(.+): (\d+) ([-+*/]) (\d+) = (\d+)\.$")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return arithmetic_rows()


def test_size_shape_and_distinct_questions(rows: list[dict]) -> None:
    assert len(rows) == ARITHMETIC_SIZE == 5000
    questions = [r["messages"][0]["content"] for r in rows]
    assert len(set(questions)) == len(questions)
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"].endswith(" have now?") and "\n" not in r["messages"][0]["content"]


def test_the_data_never_changes(rows: list[dict]) -> None:
    """Pinned: a change to the generator (or a platform difference) shows up here."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    assert arithmetic_rows() == rows
    assert rows[1]["messages"][1]["content"] == "5 bags of 5: 5 * 5 = 25.\n#### 25"
    assert digest == "93e3c87df7e25c96334bd973102eed305f6acdf8d7e703a0b0a0146cf455d947"


def test_every_worked_answer_recomputes(rows: list[dict]) -> None:
    """Parse each chain of thought: every line's arithmetic is right, each step starts from the previous
    result, the question's sentences state each operand, and '#### N' is the last result."""
    counts = {1: 0, 2: 0, 3: 0}
    for r in rows:
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        *lines, final = answer.split("\n")
        sentences = re.split(r"(?<=[.?]) ", question)
        assert 1 <= len(lines) <= 3
        counts[len(lines)] += 1
        bags = " bags with " in sentences[0]
        assert len(sentences) == len(lines) + 2 - bags  # start, one per operation (the bags start is one), question
        value = None
        for i, line in enumerate(lines):
            match = LINE.match(line)
            assert match, line
            left, op, right, result = int(match[2]), match[3], int(match[4]), int(match[5])
            assert APPLY[op](left, right) == result and result >= 1
            assert value is None or left == value  # a chain: each step works on the last result
            if i == 0 and bags:
                assert op == "*" and f" has {left} bags with {right} " in sentences[0]
            else:
                if i == 0:
                    assert f" has {left} " in sentences[0]
                said = sentences[i + 1 - bags]
                expected = {"+": f" {right} more ", "-": f" {right} ", "*": "twice" if right == 2 else "three times",
                            "/": f" into {right} equal piles"}[op]
                assert expected in said, (question, line)
            value = result
        assert final == f"#### {value}" and extract_answer(answer) == str(value) and value < 100
    assert min(counts.values()) > 1400  # 1, 2 and 3 operations about equally often


def test_problems_are_a_pure_function_of_index_and_seed() -> None:
    assert arithmetic_problem(7) == arithmetic_problem(7)
    assert arithmetic_problem(7, seed=1) != arithmetic_problem(7)
    assert arithmetic_problems(10, seed=3)[:4] == arithmetic_problems(4, seed=3)


def test_embedded_name_loads_as_chat_data() -> None:
    data = load_dataset("arithmetic", test_size=1000)
    assert data.labels is None and len(data.train) == 4000 and len(data.test) == 1000
    e = data.test[0]
    assert e.messages is not None and e.messages[-1].role == "assistant" and e.completion == e.messages[-1].content
    assert e.completion.splitlines()[-1].startswith("#### ")
