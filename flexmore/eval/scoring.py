"""Exact match: the answer is what follows the last "Answer:" in the generation, else its first line; compared after
stripping spaces, a trailing period and case."""

from __future__ import annotations

import re

ANSWER = re.compile(r"Answer:\s*([^\n]*)")


def extract_answer(generation: str) -> str:
    found = ANSWER.findall(generation)
    text = found[-1] if found else generation.strip().split("\n", 1)[0]
    return normalise(text)


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def exact_match(generation: str, gold: str) -> float:
    return float(extract_answer(generation) == normalise(str(gold)))
