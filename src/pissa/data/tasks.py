"""Embedded generative tasks whose answers can be checked: built by pissa itself, offline.

``arithmetic``: multi-step arithmetic word problems in chat form, the shape of GSM8K /
MetaMathQA sized for a 135M model on a CPU. Each row is one conversation, a user question and
an assistant answer::

    {"messages": [
        {"role": "user", "content": "Mia has 3 bags with 4 shells in each. Mia loses 5 shells.
                                     How many shells does Mia have now?"},
        {"role": "assistant", "content": "3 bags of 4: 3 * 4 = 12.\\nLosing 5: 12 - 5 = 7.\\n#### 7"}]}

(the question is one line). How a problem is built, for problem number ``i`` (0, 1, 2, ...):

1. Every random choice is a draw from SHA-256 of ``"{seed}:{i}:{k}"`` (k = 0, 1, 2, ... counts
   the draws of that problem): the first 8 bytes as a big-endian integer, modulo the number of
   options. No library RNG is involved, so the data is the same on every Python and platform.
2. Draws, in order: the number of operations ``n`` in 1..3; a name (:data:`NAMES`); a plural
   noun (:data:`THINGS`); whether the start is a product (probability 1/3; it then counts as
   the first operation: "``{a}`` bags with ``{b}`` ... in each", a in 2..5, b in 2..10; otherwise
   "has ``{start}``", start in 2..20); then each remaining operation: its kind, uniformly among
   those allowed for the current value v, and its operand and wording:

   - add ``b`` in 1..20 ("finds / buys ``b`` more", "A friend gives ... ``b`` more");
   - subtract ``b`` in 1..v-1, allowed when v >= 2 ("gives ``b`` ... to a friend", "loses", "uses");
   - multiply by 2 or 3, allowed when v <= 25 ("now has twice / three times as many ...");
   - divide by ``b``, a divisor of v in 2..5, allowed when there is one ("splits ... into ``b``
     equal piles and keeps one pile").

   Every intermediate value is a whole number >= 1, and every answer is below 100 (at most 95).
3. The question is the sentences joined by spaces plus "How many {things} does {name} have
   now?"; the answer has one line per operation, ``"{what}: {x} {op} {y} = {z}."`` with op one
   of ``+ - * /``, then the final line ``"#### {answer}"``.
4. Problems whose question repeats an earlier one are skipped; generation stops at
   :data:`ARITHMETIC_SIZE` distinct questions (5,000 with :data:`ARITHMETIC_SEED` = 0: a
   fine-tuning run holds out 1,000 for testing and trains on 4,000).

The rows carry no system message: the tokenizer's chat template adds its own default, if any.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

ARITHMETIC_SIZE = 5000
"""Distinct problems in the embedded ``arithmetic`` task."""

ARITHMETIC_SEED = 0
"""Seed of the embedded ``arithmetic`` task."""

NAMES = ("Mia", "Sam", "Ana", "Leo", "Zoe", "Ben", "Ivy", "Max", "Eva", "Tom", "Lily", "Omar", "Nina", "Raj",
         "Kim", "Luca", "Sara", "Jack", "Emma", "Noah")
THINGS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "shells", "stamps", "coins",
          "balloons", "eggs", "flowers", "toy cars", "beads")

Op = Literal["+", "-", "*", "/"]


@dataclass(frozen=True)
class Step:
    """One operation of a solution: ``left op right = result``; ``what`` names it in the answer."""

    left: int
    op: Op
    right: int
    result: int
    what: str

    @property
    def line(self) -> str:
        """The answer line, e.g. ``"Losing 5: 12 - 5 = 7."``."""
        return f"{self.what}: {self.left} {self.op} {self.right} = {self.result}."


@dataclass(frozen=True)
class Problem:
    """A word problem with its worked solution."""

    question: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def solution(self) -> str:
        """The assistant's answer: one line per step, then ``#### answer``."""
        return "\n".join([*(s.line for s in self.steps), f"#### {self.answer}"])

    def row(self) -> dict[str, list[dict[str, str]]]:
        """The chat row ``{"messages": [user question, assistant solution]}``."""
        return {"messages": [{"role": "user", "content": self.question},
                             {"role": "assistant", "content": self.solution}]}


class _Draws:
    """Deterministic draws for one problem: SHA-256 of ``"{seed}:{index}:{k}"``, k = 0, 1, ..."""

    def __init__(self, seed: int, index: int) -> None:
        self._key = f"{seed}:{index}"
        self._count = 0

    def integer(self, low: int, high: int) -> int:
        """An integer in ``[low, high]`` (both included)."""
        digest = hashlib.sha256(f"{self._key}:{self._count}".encode()).digest()
        self._count += 1
        return low + int.from_bytes(digest[:8], "big") % (high - low + 1)

    def choice(self, options: tuple[str, ...] | list[str]) -> str:
        return options[self.integer(0, len(options) - 1)]


def _divisors(v: int) -> list[int]:
    return [b for b in range(2, 6) if v % b == 0]


def arithmetic_problem(index: int, seed: int = ARITHMETIC_SEED) -> Problem:
    """Problem number ``index`` of the task with ``seed`` (see the module docstring)."""
    draw = _Draws(seed, index)
    n_ops = draw.integer(1, 3)
    name, things = draw.choice(NAMES), draw.choice(THINGS)
    sentences: list[str] = []
    steps: list[Step] = []
    if draw.integer(0, 2) == 0:
        a, b = draw.integer(2, 5), draw.integer(2, 10)
        sentences.append(f"{name} has {a} bags with {b} {things} in each.")
        steps.append(Step(a, "*", b, a * b, f"{a} bags of {b}"))
        value = a * b
    else:
        value = draw.integer(2, 20)
        sentences.append(f"{name} has {value} {things}.")
    while len(steps) < n_ops:
        kinds = ["+"] + ["-"] * (value >= 2) + ["*"] * (value <= 25) + ["/"] * bool(_divisors(value))
        kind = draw.choice(kinds)
        if kind == "+":
            b = draw.integer(1, 20)
            sentence, what = [
                (f"{name} finds {b} more {things}.", f"Finding {b} more"),
                (f"{name} buys {b} more {things}.", f"Buying {b} more"),
                (f"A friend gives {name} {b} more {things}.", f"Getting {b} more"),
            ][draw.integer(0, 2)]
            step = Step(value, "+", b, value + b, what)
        elif kind == "-":
            b = draw.integer(1, value - 1)
            sentence, what = [
                (f"{name} gives {b} {things} to a friend.", f"Giving away {b}"),
                (f"{name} loses {b} {things}.", f"Losing {b}"),
                (f"{name} uses {b} {things}.", f"Using {b}"),
            ][draw.integer(0, 2)]
            step = Step(value, "-", b, value - b, what)
        elif kind == "*":
            b = draw.integer(2, 3)
            times = "twice" if b == 2 else "three times"
            sentence, what = f"Then {name} has {times} as many {things} as before.", f"{times.capitalize()} as many"
            step = Step(value, "*", b, value * b, what)
        else:
            divisors = _divisors(value)
            b = divisors[draw.integer(0, len(divisors) - 1)]
            sentence = f"{name} splits the {things} into {b} equal piles and keeps one pile."
            step = Step(value, "/", b, value // b, f"Keeping one of {b} piles")
        sentences.append(sentence)
        steps.append(step)
        value = step.result
    sentences.append(f"How many {things} does {name} have now?")
    return Problem(" ".join(sentences), tuple(steps))


def arithmetic_problems(size: int = ARITHMETIC_SIZE, seed: int = ARITHMETIC_SEED) -> list[Problem]:
    """The first ``size`` problems with distinct questions, in generation order."""
    problems: list[Problem] = []
    seen: set[str] = set()
    index = 0
    while len(problems) < size:
        problem = arithmetic_problem(index, seed)
        index += 1
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def arithmetic_rows(size: int = ARITHMETIC_SIZE, seed: int = ARITHMETIC_SEED) -> list[dict[str, list[dict[str, str]]]]:
    """The task as chat rows (see :meth:`Problem.row`)."""
    return [p.row() for p in arithmetic_problems(size, seed)]
