"""The public mix the base model trains on: everyday prose, with a little easy arithmetic and a little simple code.

It touches every other domain lightly (as a web crawl would) but holds none of their depth: no multi-step
solutions, none of the facts world, no real source files.
"""

from __future__ import annotations

import random
from typing import Iterator

from flexmore.data.domains.streams import split_seed

SALT = 1
PEOPLE = ["the farmer", "a young girl", "the old man", "my neighbour", "the teacher", "a tired traveller", "the baker",
          "our guide", "the children", "a stranger", "the captain", "her brother"]
VERBS = ["walked to", "looked at", "painted", "cleaned", "visited", "remembered", "found", "left", "repaired", "watched"]
THINGS = ["the river", "a small house", "the market", "an old bridge", "the garden", "a red boat", "the hill",
          "the library", "a wooden gate", "the harbour", "the station", "a quiet street"]
TIMES = ["in the morning", "after lunch", "before the storm", "on Sunday", "at dusk", "every spring", "last winter",
         "at noon", "late at night"]
ADJ = ["bright", "cold", "busy", "calm", "windy", "warm", "grey", "long", "quiet", "strange"]
FEEL = ["It was a good day.", "Nobody said a word.", "Everyone was happy.", "The air smelled of rain.",
        "It felt like home.", "Then it was time to go."]
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(TIMES)}."
    return s[0].upper() + s[1:]


def _story(rng: random.Random) -> str:
    parts = [f"The day was {rng.choice(ADJ)}."]
    parts += [_sentence(rng) for _ in range(rng.randint(3, 8))]
    parts.append(rng.choice(FEEL))
    return " ".join(parts)


def _easy_sum(rng: random.Random) -> str:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return f"{NUM_WORDS[a].capitalize()} and {NUM_WORDS[b]} make {NUM_WORDS[a + b]}."


def _snippet(rng: random.Random) -> str:
    name, var = rng.choice(["total", "count", "size", "score"]), rng.choice(["x", "n", "value", "item"])
    return f"def get_{name}({var}):\n    return {var} + {rng.randint(1, 9)}\n"


def documents(split: str, seed: int) -> Iterator[str]:
    rng = random.Random(split_seed(seed, split, SALT))
    while True:
        r = rng.random()
        if r < 0.8:
            yield "\n\n".join(_story(rng) for _ in range(rng.randint(1, 3)))
        elif r < 0.9:
            yield " ".join(_easy_sum(rng) for _ in range(rng.randint(1, 4)))
        else:
            yield _snippet(rng)
