"""Final answers in generated text: extraction (``#### N``, "the answer is N", else the last number),
normalization and exact match.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?"
"""A number: optional minus (not after a word character, so 5-3 has no -3), thousands commas, decimals."""


_MARKED = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")


_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)


_ANY = re.compile(_NUMBER)


def _normalize(number: str) -> str:
    """``"1,234.50"`` -> ``"1234.5"``; ``"-0"`` -> ``"0"``."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return number
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of ``text`` as a normalized number (rules in the module docstring), or None."""
    for pattern in (_MARKED, _ANSWER_IS, _ANY):
        found = pattern.findall(text)
        if found:
            return _normalize(found[-1])
    return None


def has_final_answer(text: str) -> bool:
    """Whether ``text`` states its answer explicitly (``#### N`` or "the answer is N")."""
    return bool(_MARKED.search(text) or _ANSWER_IS.search(text))


def answers_match(generated: str, reference: str) -> bool:
    """Exact match of the extracted answers; a reference without a number must match as whitespace-normalized text."""
    expected = extract_answer(reference)
    if expected is None:
        return " ".join(generated.split()) == " ".join(reference.split())
    return extract_answer(generated) == expected
