"""Reasoning-heavy text: multi-step arithmetic, linear equations and word problems, each with a worked solution."""

from __future__ import annotations

import random
from typing import Iterator

from flexmore.data.domains.streams import split_seed

SALT = 3
CATEGORY = "reasoning"
NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia", "Oto", "Pia"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards", "beads", "tickets"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _chain(rng: random.Random) -> tuple[str, str, int]:
    """(((a op b) op c) op d): evaluated left to right, one line per step."""
    n_ops = rng.randint(2, 4)
    value = rng.randint(2, 60)
    expr, steps = str(value), []
    for i in range(n_ops):
        op = rng.choice("+-*") if i else rng.choice("+-")
        b = rng.randint(2, 12) if op == "*" else rng.randint(2, 60)
        new = OPS[op](value, b)
        steps.append(f"{value} {op} {b} = {new}.")
        expr = f"({expr} {op} {b})" if i < n_ops - 1 else f"{expr} {op} {b}"
        value = new
    return f"Compute {expr}.", " ".join(steps), value


def _equation(rng: random.Random) -> tuple[str, str, int]:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 30), rng.randint(-40, 40)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    q = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
    move = f"Subtract {b} from both sides" if b >= 0 else f"Add {abs(b)} to both sides"
    sol = f"{move}: {a}x = {c - b}. Divide both sides by {a}: x = {x}."
    return q, sol, x


def _word(rng: random.Random) -> tuple[str, str, int]:
    p, q = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    start, buy, groups = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 6)
    give = rng.randint(1, start + buy)
    total = start + buy
    left = total - give
    final = left * groups
    text = (
        f"{p} has {start} {item}. {p} buys {buy} more, then gives {give} to {q}. "
        f"Then every one of {p}'s {item} is traded for {groups} new ones. How many {item} does {p} have now?"
    )
    sol = f"{start} + {buy} = {total}. {total} - {give} = {left}. {left} * {groups} = {final}."
    return text, sol, final


KINDS = (_chain, _equation, _word)


def problem(rng: random.Random) -> tuple[str, str, int]:
    return rng.choice(KINDS)(rng)


def format_problem(question: str, solution: str | None = None, answer: int | None = None) -> str:
    text = f"Problem: {question}\nSolution:"
    if solution is not None:
        text += f" {solution}\nAnswer: {answer}\n"
    return text


def documents(split: str, seed: int) -> Iterator[str]:
    rng = random.Random(split_seed(seed, split, SALT))
    while True:
        yield "\n".join(format_problem(*problem(rng)) for _ in range(rng.randint(2, 5)))


def qa_pairs(split: str, n: int, seed: int) -> list[dict]:
    """Fresh problems (a stream of their own); the model must produce the worked solution, then the answer."""
    rng = random.Random(split_seed(seed, split, SALT + 100))
    out = []
    for _ in range(n):
        q, _, a = problem(rng)
        out.append({"question": format_problem(q), "answer": str(a), "category": CATEGORY})
    return out


def mc_items(split: str, n: int, seed: int) -> list[dict]:
    """Fresh problems with their worked solution up to the last result, which is to be chosen from the true value
    and three near misses (off by 1, 2 or 10): graded arithmetic in context, where whole solutions are still rare."""
    rng = random.Random(split_seed(seed, split, SALT + 200))
    out = []
    for _ in range(n):
        q, sol, a = problem(rng)
        head, last = sol.rsplit(" ", 1)
        assert last == f"{a}.", (sol, a)
        wrong = rng.sample([a + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        options = [str(v) for v in wrong + [a]]
        rng.shuffle(options)
        out.append({"question": format_problem(q) + " " + head, "choices": options, "answer": options.index(str(a)),
                    "category": CATEGORY})
    return out
