"""The embedded multi-domain corpus: each domain generates its documents locally and deterministically.

A domain module exposes ``documents(split, seed) -> Iterator[str]`` (endless, or ending when the source is exhausted)
and, where it has tasks, ``qa_pairs(split, n, seed) -> list[dict]`` with keys question, answer, category.
"""

from __future__ import annotations

from types import ModuleType

from flexmore.data.domains import code, facts, math, public
from flexmore.data.domains.streams import SPLITS, split_seed

DOMAINS: dict[str, ModuleType] = {"public": public, "code": code, "math": math, "facts": facts}
__all__ = ["DOMAINS", "SPLITS", "get_domain", "split_seed"]


def get_domain(name: str) -> ModuleType:
    if name not in DOMAINS:
        raise ValueError(f"unknown embedded domain {name!r}; allowed: {', '.join(DOMAINS)}")
    return DOMAINS[name]
