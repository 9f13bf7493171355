"""Evaluate one model on validation domains and tasks; results as tidy rows (one per model x task x metric)."""

from __future__ import annotations

import re

import torch

from flexmore.data.tokenizer import Tokenizer
from flexmore.eval.generate import greedy, request_logprobs
from flexmore.eval.scoring import exact_match
from flexmore.eval.tasks import Task
from flexmore.eval.validation import evaluate

_MATH_DONE = re.compile(r"Answer:[^\n]*\n")


def stop_rule(task: Task):
    """Stop a generation once the answer line is complete."""
    if task.name == "math_qa":
        return lambda text: bool(_MATH_DONE.search(text))
    return lambda text: "\n" in text


def score_task(model, tokenizer: Tokenizer, task: Task, device: torch.device, batch_size: int = 256,
               progress: bool = False) -> dict[str, float]:
    """Batches are wide: a decoding step's cost is mostly launches, so fewer, wider steps win."""
    if task.kind == "choice":
        right, right_norm = choice_outcomes(model, tokenizer, task, device, batch_size, progress)
        return {"acc": sum(right) / len(task.items), "acc_norm": sum(right_norm) / len(task.items)}
    gens = greedy(model, tokenizer, [it["question"] for it in task.items], task.max_new_tokens, device,
                  stop=stop_rule(task), batch_size=batch_size, progress=f"{task.name} (generation)" if progress else None)
    return {"exact_match": sum(exact_match(g, it["answer"]) for g, it in zip(gens, task.items)) / len(task.items)}


def choice_outcomes(model, tokenizer: Tokenizer, task: Task, device: torch.device, batch_size: int = 256,
                    progress: bool = False, evidence: str = "item") -> tuple[list[bool], list[bool]]:
    """Per item of a multiple-choice task: is the highest log-likelihood the gold choice (and per token: _norm)?
    Two models scored on the same items compare item by item (a paired difference). A mixture routed by likelihood
    picks its expert from the question and all its choices together, the same for every choice (``evidence``: see
    request_logprobs; the question alone left facts questions worded as no expert was trained on with the expert of
    the best-known wording, not the names)."""
    flat = request_logprobs(model, tokenizer, [(it["question"], " " + c) for it in task.items for c in it["choices"]],
                            device, batch_size=2 * batch_size, progress=f"{task.name} (choices)" if progress else None,
                            evidence=evidence)
    right, right_norm = [], []
    start = 0
    for it in task.items:
        scores = flat[start : start + len(it["choices"])]
        start += len(it["choices"])
        right.append(max(range(len(scores)), key=lambda i: scores[i][0]) == it["answer"])
        right_norm.append(max(range(len(scores)), key=lambda i: scores[i][0] / max(1, scores[i][1])) == it["answer"])
    return right, right_norm


def paired_difference(a: list[bool], b: list[bool], z: float = 1.959964) -> dict:
    """Accuracy of a minus b over the same items, with the 95% interval of that mean difference (normal)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired items: {len(a)} against {len(b)}; the same non-empty items are needed")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 if n > 1 else 0.0
    half = z * sd / n ** 0.5
    return {"diff": mean, "ci95": [mean - half, mean + half], "n": n, "discordant": sum(1 for x in d if x)}


def evaluate_model(model, tokenizer: Tokenizer, tasks: list[Task], val_sets: dict, device: torch.device,
                   labels: dict | None = None, progress: bool = True) -> list[dict]:
    """Rows: {**labels, task, category, metric, score, n (items)}; validation losses as task 'val/<domain>', metric
    'loss'. ``progress``: a bar per task (items/s, ETA) on rank 0's stderr."""
    labels = labels or {}
    rows = []
    if val_sets:
        for domain, loss in evaluate(model, val_sets, device, "auto").items():
            rows.append({**labels, "task": f"val/{domain}", "category": "loss", "domain": domain, "metric": "loss",
                         "score": loss})
    for task in tasks:
        for metric, score in score_task(model, tokenizer, task, device, progress=progress).items():
            rows.append({**labels, "task": task.name, "category": task.category, "domain": task.domain,
                         "metric": metric, "score": score, "n": len(task.items)})
    return rows
