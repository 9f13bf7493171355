"""Rank allocation under a parameter budget: pick one rank per expert to maximise the summed value (a sweep score,
or retained SVD energy when no sweep exists) with the experts' parameters within the budget.

A dynamic program over experts keeps, for each total parameter count reached, the best value and its choice, pruned
to the Pareto front (more parameters must buy more value), so it stays small for realistic rank lists.
"""

from __future__ import annotations


def allocate(options: dict[str, dict[int | str, tuple[int, float]]], budget: int) -> tuple[dict[str, int | str], int, float]:
    """options[expert][rank] = (params, value) -> ({expert: rank}, params used, value). Raises if nothing fits."""
    front: list[tuple[int, float, dict]] = [(0, 0.0, {})]
    for expert, opts in options.items():
        if not opts:
            raise ValueError(f"expert {expert!r} has no rank options")
        nxt = []
        for params, value, choice in front:
            for rank, (p, v) in opts.items():
                if params + p <= budget:
                    nxt.append((params + p, value + v, {**choice, expert: rank}))
        if not nxt:
            cheapest = sum(min(p for p, _ in o.values()) for o in options.values())
            raise ValueError(f"budget {budget:,} is below the cheapest allocation ({cheapest:,} parameters)")
        nxt.sort(key=lambda s: (s[0], -s[1]))
        front, best = [], float("-inf")
        for s in nxt:
            if s[1] > best:
                front.append(s)
                best = s[1]
    params, value, choice = max(front, key=lambda s: s[1])
    return choice, params, value
