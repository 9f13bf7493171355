"""Tasks score known answers correctly: a model that emits the gold answer scores 1, a wrong one 0."""

from __future__ import annotations

import json

import pytest
import torch

from flexmore.data.tokenizer import ByteTokenizer
from flexmore.eval.evaluate import score_task
from flexmore.eval.scoring import exact_match, extract_answer
from flexmore.eval.tasks import embedded_tasks, load_jsonl_task, parse_task_spec
from flexmore.model import ModelConfig


class Scripted(torch.nn.Module):
    """Continues each known prompt with a scripted text: next token = script[position - len(prompt)]."""

    def __init__(self, scripts: dict[str, str]):
        super().__init__()
        tok = ByteTokenizer()
        self.scripts = {tuple(tok.encode(p)): tok.encode(s) + [tok.eos_id] for p, s in scripts.items()}
        self.cfg = ModelConfig(vocab_size=320, max_seq_len=512)

    def forward(self, x, attention_mask=None, cache=None):
        if cache is not None:  # greedy's KV cache: keep the tokens themselves, answer for the new positions only
            full = x if getattr(cache, "ids", None) is None else torch.cat([cache.ids, x], 1)
            cache.ids = full
            return type("Out", (), {"logits": self.forward(full, attention_mask).logits[:, -x.shape[1]:]})()
        B, T = x.shape
        logits = torch.zeros(B, T, 320)
        for b in range(B):
            off = 0 if attention_mask is None else int((~attention_mask[b].bool()).sum())  # left padding
            row = tuple(x[b, off:].tolist())
            for prompt, script in self.scripts.items():
                if row[: len(prompt)] == prompt:
                    for t in range(len(prompt) - 1, T - off):
                        k = t + 1 - len(prompt)
                        if k < len(script):
                            logits[b, off + t, script[k]] = 20.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_rules():
    assert exact_match(" 3 + 4 = 7. 7 * 2 = 14.\nAnswer: 14\n", "14") == 1.0
    assert exact_match(" Lisbor\nQuestion: ...", "lisbor") == 1.0
    assert exact_match(" Lisbor.", "Lisbor") == 1.0
    assert exact_match(" Answer: 15", "14") == 0.0
    assert extract_answer("Answer: 1\nAnswer: 2\n") == "2"


@pytest.mark.parametrize("right", [True, False])
def test_generative_task_scores_gold_1_and_wrong_0(right):
    task = embedded_tasks(n=4)[0]  # math_qa
    scripts = {it["question"]: f" worked.\nAnswer: {it['answer'] if right else int(it['answer']) + 1}\nmore"
               for it in task.items}
    assert score_task(Scripted(scripts), ByteTokenizer(), task, torch.device("cpu")) == {"exact_match": float(right)}


def test_facts_task_stops_at_the_line_end():
    task = embedded_tasks(n=3)[1]  # facts_qa
    scripts = {it["question"]: f" {it['answer']}\nQuestion: something else" for it in task.items}
    assert score_task(Scripted(scripts), ByteTokenizer(), task, torch.device("cpu"))["exact_match"] == 1.0


@pytest.mark.parametrize("right", [True, False])
def test_multiple_choice_by_loglikelihood(tmp_path, right):
    items = [{"question": "Q: sky colour?", "choices": ["green", "blue", "red"], "answer": 1},
             {"question": "Q: two plus two?", "choices": ["four", "five"], "answer": 0}]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    task = parse_task_spec(f"{path}:toy:knowledge:facts")
    assert task.kind == "choice" and task.domain == "facts"
    scripts = {it["question"]: " " + it["choices"][it["answer"] if right else (it["answer"] + 1) % len(it["choices"])]
               for it in items}
    scores = score_task(Scripted(scripts), ByteTokenizer(), task, torch.device("cpu"))
    assert scores["acc"] == float(right)


def test_bad_task_files(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="needs 'question' and 'answer'"):
        load_jsonl_task(p, "t", "knowledge")
    p.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(ValueError, match="'answer' must index 'choices'"):
        load_jsonl_task(p, "t", "knowledge")
    with pytest.raises(ValueError, match="expected path.jsonl:name:category"):
        parse_task_spec(str(p))
    with pytest.raises(FileNotFoundError):
        load_jsonl_task(tmp_path / "none.jsonl", "t", "x")


def test_eval_cli_writes_a_tidy_table(tmp_path, capsys):
    from conftest import tiny_config

    from flexmore.cli.eval import main
    from flexmore.train.loop import train

    train(tiny_config(tmp_path, train={"steps": 2}))
    assert main(["--model", str(tmp_path / "run"), "--n", "2", "--val-domains", "math", "--val-batches", "1",
                 "--seq-len", "32", "--out", str(tmp_path / "res")]) == 0
    rows = json.loads((tmp_path / "res.json").read_text())
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("val/math", "loss"), ("math_qa", "exact_match"), ("facts_qa", "exact_match"), ("math_mc", "acc"),
        ("math_mc", "acc_norm"), ("facts_mc", "acc"), ("facts_mc", "acc_norm")}
    assert all(r["params"] > 0 for r in rows) and (tmp_path / "res.csv").read_text().startswith("model,mixture")
    err = capsys.readouterr().err  # a progress bar per task, with its rate
    assert "math_qa (generation)" in err and "facts_mc (choices)" in err and "item/s" in err
    # without --seq-len: the length the model was trained at (32, from its folder), said so
    assert main(["--model", str(tmp_path / "run"), "--tasks", "--val-domains", "math", "--val-batches", "1",
                 "--out", str(tmp_path / "res2")]) == 0
    assert "validation at seq_len 32: the length the model was trained at" in capsys.readouterr().out
    again = json.loads((tmp_path / "res2.json").read_text())
    assert [r["score"] for r in again] == [r["score"] for r in rows if r["task"] == "val/math"]


def test_eval_cli_bad_input(tmp_path, capsys):
    from flexmore.cli.eval import main

    assert main(["--model", str(tmp_path / "nothing"), "--n", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--n=0 must be >= 1" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "no model or checkpoint found" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_batched_greedy_equals_one_prompt_at_a_time():
    import dataclasses

    from conftest import tiny_config  # noqa: F401  (the session cache fixture)

    from flexmore.eval.generate import greedy
    from flexmore.model import build_model, load_preset

    model = build_model(dataclasses.replace(load_preset("tiny"), vocab_size=320), seed=1)
    tok = ByteTokenizer()
    prompts = ["Q: a", "Question: longer prompt here?", "xyz", "Question: mid size"]
    batched = greedy(model, tok, prompts, 12, torch.device("cpu"), batch_size=4)
    alone = [greedy(model, tok, [p], 12, torch.device("cpu"))[0] for p in prompts]
    assert batched == alone and any(batched)


@pytest.mark.parametrize("context", ["token", "prefix", "sequence", "likelihood", "posterior"])
def test_cached_decoding_gives_the_logits_of_the_whole_sequence(context):
    """Left-padded MoE batch: the prompt, then one token at a time through the KV cache, against one forward pass
    over everything (the uncached reference); then greedy's text against decoding without a cache. Prefix routing
    carries its running sums in the cache; sequence routing also its token-routed pass's keys."""
    import dataclasses

    from flexmore.eval.generate import greedy
    from flexmore.model import build_model, load_preset
    from flexmore.model.layers import KVCache

    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=320, num_experts=3, top_k=2, route_context=context)
    model = build_model(cfg, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (3, 14), generator=g)
    valid = torch.ones(3, 14, dtype=torch.bool)
    valid[1, :5] = valid[2, :2] = False  # left padding
    with torch.no_grad():
        full = model(ids, attention_mask=valid).logits
        cache = KVCache(cfg.n_layers)
        parts = [model(ids[:, :8], attention_mask=valid[:, :8], cache=cache).logits]
        for t in range(8, 14):
            parts.append(model(ids[:, t : t + 1], attention_mask=valid[:, : t + 1], cache=cache).logits)
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, 1)[valid], full[valid], rtol=1e-5, atol=1e-5)

    @torch.no_grad()
    def uncached(prompt: str, n: int) -> str:
        x = torch.tensor([ByteTokenizer().encode(prompt)])
        out = []
        for _ in range(n):
            t = int(model(x).logits[0, -1].argmax())
            if t == ByteTokenizer().eos_id:
                break
            out.append(t)
            x = torch.cat([x, torch.tensor([[t]])], 1)
        return ByteTokenizer().decode(out)

    prompts = ["Q: a", "Question: longer prompt here?", "xyz"]
    assert greedy(model, ByteTokenizer(), prompts, 10, torch.device("cpu")) == [uncached(p, 10) for p in prompts]


@pytest.mark.parametrize("name", ["math_mc", "facts_mc"])
@pytest.mark.parametrize("right", [True, False])
def test_embedded_choice_tasks_score_gold_1_and_wrong_0(name, right):
    task = {t.name: t for t in embedded_tasks(n=6)}[name]
    assert task.kind == "choice" and all(len(set(it["choices"])) == 4 for it in task.items)
    scripts = {it["question"]: " " + it["choices"][it["answer"] if right else (it["answer"] + 1) % 4]
               for it in task.items}
    assert score_task(Scripted(scripts), ByteTokenizer(), task, torch.device("cpu"))["acc"] == float(right)


def test_choice_items_are_true():
    """math_mc: the gold option is the last step's true result; facts_mc: the gold option is the world's fact."""
    import re

    from flexmore.data.domains import facts, math

    for it in math.mc_items("val", 40, 0):
        gold = int(it["choices"][it["answer"]])
        step = re.search(r"(-?\d+) ([-+*]) (\d+) =$", it["question"])
        if step:
            a, op, b = step.groups()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == gold
        else:  # a linear equation's last step: divide
            ax, a = re.search(r"(\d+)x = (-?\d+)\. Divide both sides by (\d+): x =$", it["question"]).group(2, 3)
            assert int(ax) == int(a) * gold
    cities, people, _ = facts.world()
    colour = {p.name: p.color for p in people}
    for it in facts.mc_items("val", 60, 0):
        m = re.match(r"Ask (.+): the best colour is$", it["question"])
        if m:
            assert it["choices"][it["answer"]] == colour[m.group(1)]
        m = re.match(r"(.+) belongs to the country of$", it["question"])
        if m:
            assert it["choices"][it["answer"]] == cities[m.group(1)]


def test_batched_choice_scores_equal_one_request_at_a_time():
    import dataclasses

    from flexmore.eval.generate import request_logprobs
    from flexmore.model import build_model, load_preset

    model = build_model(dataclasses.replace(load_preset("tiny"), vocab_size=320), seed=1)
    tok = ByteTokenizer()
    reqs = [("Q: a", " yes"), ("Question: longer context here?", " no way"), ("", " empty context"), ("xyz", "")]
    batched = request_logprobs(model, tok, reqs, torch.device("cpu"), batch_size=4)
    alone = [request_logprobs(model, tok, [r], torch.device("cpu"))[0] for r in reqs]
    assert [n for _, n in batched] == [4, 7, 14, 0]
    for (a, n), (b, m) in zip(batched, alone):
        assert n == m and a == pytest.approx(b, abs=1e-4) and (n == 0 or a < 0)


def test_lm_eval_harness_on_a_local_task_gives_our_own_scores(tmp_path, monkeypatch):
    """A YAML task over a local JSONL file (no download): lm-evaluation-harness with our adapter scores the same
    items as our own scorer, item for item."""
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from conftest import tiny_config

    import flexmore.eval.lm_eval_adapter  # noqa: F401  (registers 'flexmore')
    from flexmore.store.modeldir import load_model
    from flexmore.train.loop import train

    train(tiny_config(tmp_path, train={"steps": 20}))
    task = next(t for t in embedded_tasks(24) if t.name == "math_mc")
    with open(tmp_path / "items.jsonl", "w") as f:
        for it in task.items:
            f.write(json.dumps(it) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model="flexmore", model_args=f"path={tmp_path / 'run'}", tasks=["local_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True)
    theirs = [int(max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["target"])
              for s in sorted(res["samples"]["local_mc"], key=lambda s: s["doc_id"])]
    model = load_model(tmp_path / "run").eval()
    ours = score_task(model, ByteTokenizer(), task, torch.device("cpu"))["acc"]
    assert len(theirs) == 24 and res["results"]["local_mc"]["acc,none"] == pytest.approx(ours)
    assert sum(theirs) / 24 == pytest.approx(ours)


def test_choice_outcomes_are_the_items_behind_the_accuracy_and_compare_paired():
    import statistics

    from flexmore.eval.evaluate import choice_outcomes, paired_difference

    task = {t.name: t for t in embedded_tasks(n=8)}["math_mc"]
    wrong = {1, 4, 5}
    scripts = {it["question"]: " " + it["choices"][(it["answer"] + (i in wrong)) % 4] for i, it in enumerate(task.items)}
    right, _ = choice_outcomes(Scripted(scripts), ByteTokenizer(), task, torch.device("cpu"))
    assert right == [i not in wrong for i in range(8)]
    assert score_task(Scripted(scripts), ByteTokenizer(), task, torch.device("cpu"))["acc"] == 5 / 8
    a, b = [True, True, False, False, True], [True, False, False, True, False]
    d = [0.0, 1.0, 0.0, -1.0, 1.0]
    half = 1.959964 * statistics.stdev(d) / len(d) ** 0.5
    got = paired_difference(a, b)
    assert got["diff"] == pytest.approx(0.2) and got["discordant"] == 3
    assert got["ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    with pytest.raises(ValueError, match="paired items: 5 against 4"):
        paired_difference(a, b[:4])
