"""Multiple choice under likelihood routing: which two-expert model wins each question, and what that costs.

Reads the base and experts a bench_mixture.py run trained (``--work``, one recipe) and scores the embedded
multiple-choice items with each expert's two-expert model alone and with the merged mixture routed by likelihood and
by posterior, with every token (``all``), the question alone (``context``) or the question and all its choices
(``item``, what the evaluation uses) as routing evidence. Per task: accuracies, how often each two-expert model gives
the question the highest log-likelihood, and the items that differ from the task's own expert alone; the facts items
also grouped by their wording (the last two words of the question: one held-out template per kind of fact). Writes
one JSON.

    python benchmarks/mc_routing.py --work outputs/bench-mixture/small --n 2000 --out $OUT/mc_by_template.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexmore.data import ByteTokenizer  # noqa: E402
from flexmore.eval.evaluate import choice_outcomes  # noqa: E402
from flexmore.eval.generate import EVIDENCE, request_logprobs  # noqa: E402
from flexmore.eval.tasks import embedded_tasks  # noqa: E402
from flexmore.experts.merge import merge, reroute  # noqa: E402

RULES = [(rule, evidence) for rule in ("likelihood", "posterior") for evidence in EVIDENCE]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="a bench_mixture.py work folder of one size (holds base/, experts/)")
    ap.add_argument("--recipe", default="negatives+route+bias")
    ap.add_argument("--domains", nargs="+", default=["math", "facts", "code"])
    ap.add_argument("--n", type=int, default=2000, help="items per task")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    base, arts = work / "base" / "model", [work / "experts" / args.recipe / d / "expert" for d in args.domains]
    missing = [str(p) for p in [base, *arts] if not p.is_dir()]
    if missing:
        raise SystemExit(f"not found (run bench_mixture.py with --work first): {', '.join(missing)}")
    tok, device = ByteTokenizer(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [t for t in embedded_tasks(args.n) if t.kind == "choice"]
    right, question = {}, {}
    for d, art in zip(args.domains, arts):
        m = merge(base, [art]).to(device)
        right[d] = {t.name: choice_outcomes(m, tok, t, device)[0] for t in tasks}
        question[d] = {t.name: [s for s, _ in request_logprobs(m, tok, [("", it["question"]) for it in t.items],
                                                              device)] for t in tasks}
    merged = merge(base, arts)
    for rule, evidence in RULES:
        m = reroute(merged, context=rule).to(device)
        right[f"{rule}/{evidence}"] = {t.name: choice_outcomes(m, tok, t, device, evidence=evidence)[0]
                                         for t in tasks}
    summary, winners = {}, {}
    for t in tasks:  # each item's best two-expert model on the question
        winners[t.name] = winner = torch.tensor([question[d][t.name] for d in args.domains]).argmax(0)
        row = {k: sum(v[t.name]) / len(t.items) for k, v in right.items()}
        row["question_winner"] = {d: int((winner == i).sum()) for i, d in enumerate(args.domains)}
        own = right[t.domain][t.name]
        for rule, evidence in RULES:
            name = f"{rule}/{evidence}"
            row[f"discordant_vs_own:{name}"] = sum(a != b for a, b in zip(right[name][t.name], own))
        summary[t.name] = row
    facts = next((t for t in tasks if t.name == "facts_mc"), None)
    if facts is not None and "facts" in args.domains:
        fi = args.domains.index("facts")
        by = defaultdict(lambda: defaultdict(float))
        for i, it in enumerate(facts.items):
            row = by[" ".join(it["question"].split()[-2:])]
            row["n"] += 1
            row["facts_wins_question"] += float(int(winners["facts_mc"][i]) == fi)
            for name, v in right.items():
                row[name] += v["facts_mc"][i]
        summary["facts_by_template"] = {k: {c: (v if c == "n" else v / row["n"]) for c, v in row.items()}
                                        for k, row in by.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
