"""Tasks: the embedded math and facts question sets, or your own JSONL files.

JSONL format, one item per line:
  generative:       {"question": "...", "answer": "..."}                 scored by exact match of the extracted answer
  multiple choice:  {"question": "...", "choices": ["...", ...], "answer": 2}   scored by log-likelihood (argmax)
A task is named and given a category (``reasoning``, ``knowledge``, or any other word) and, optionally, the domain
whose expert it tests: ``path.jsonl:name:category[:domain]`` on the command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flexmore.data import TokenStream, embedded_path, eval_batches
from flexmore.data.domains import facts, math


@dataclass
class Task:
    name: str
    category: str
    items: list[dict]
    kind: str = "generate"  # generate | choice
    domain: str | None = None  # the expert domain the task measures, for best-rank selection
    max_new_tokens: int = 48
    meta: dict = field(default_factory=dict)


def embedded_tasks(n: int = 100, seed: int = 0) -> list[Task]:
    return [
        Task("math_qa", math.CATEGORY, math.qa_pairs("val", n, seed), domain="math", max_new_tokens=96),
        Task("facts_qa", facts.CATEGORY, facts.qa_pairs("val", n, seed), domain="facts", max_new_tokens=24),
        Task("math_mc", math.CATEGORY, math.mc_items("val", n, seed), kind="choice", domain="math"),
        Task("facts_mc", facts.CATEGORY, facts.mc_items("val", n, seed), kind="choice", domain="facts"),
    ]


def load_jsonl_task(path: str | Path, name: str, category: str, domain: str | None = None) -> Task:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if "question" not in item or "answer" not in item:
                raise ValueError(f"{path}:{lineno}: needs 'question' and 'answer' (has {sorted(item)})")
            if "choices" in item and not (isinstance(item["answer"], int) and 0 <= item["answer"] < len(item["choices"])):
                raise ValueError(f"{path}:{lineno}: 'answer' must index 'choices' (0..{len(item['choices']) - 1})")
            items.append(item)
    if not items:
        raise ValueError(f"task file {path} is empty")
    kinds = {"choice" if "choices" in it else "generate" for it in items}
    if len(kinds) > 1:
        raise ValueError(f"task file {path} mixes generative and multiple-choice items")
    return Task(name, category, items, kind=kinds.pop(), domain=domain)


def parse_task_spec(spec: str) -> Task:
    """``path.jsonl:name:category[:domain]``."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"task {spec!r}: expected path.jsonl:name:category[:domain]")
    return load_jsonl_task(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None)


def build_tasks(specs: list[str], n: int) -> list[Task]:
    """Command-line task specs: ``embedded`` (math_qa, facts_qa, math_mc, facts_mc with ``n`` items each) or
    ``path.jsonl:name:category``."""
    if n < 1:
        raise ValueError(f"--n={n} must be >= 1")
    tasks: list[Task] = []
    for spec in specs:
        tasks += embedded_tasks(n) if spec == "embedded" else [parse_task_spec(spec)]
    return tasks


def embedded_val_sets(domains: list[str], tokenizer, seq_len: int, batches: int, batch_size: int = 8) -> dict:
    """Fixed validation batches of the embedded domains (the first windows of each held-out split)."""
    return {d: eval_batches(TokenStream([embedded_path(d, "val", tokenizer, 400_000, 0)]), seq_len, batch_size, batches)
            for d in domains}
