"""bench_parity's summary from run records (no training here): the best learning rate per optimizer, the ratios, and
the bytes each variant's settings would send for `base` on 2 nodes x 2 GPUs (the goal's yardstick)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_parity  # noqa: E402
from bench_demo_comm import comm_row, meta_model  # noqa: E402

from flexdemo import DeMoConfig  # noqa: E402
from flexdemo.config import DEMO_WIRE  # noqa: E402


def _run(optim: str, lr: float, seed: int, loss: float, **demo) -> dict:
    settings = {"demo": dataclasses.asdict(DeMoConfig(**{**DEMO_WIRE, **demo}))}
    return {"optim": optim, "lr": lr, "replicas": 1, "seed": seed, "val_loss": loss, "best_val_loss": loss - 0.01,
            "best_step": 300, "epochs": 0.4, "comm": {"comm/payload_bytes": 1000.0 / (2 if demo else 1)},
            "settings": settings, "val_by_domain": {"public": loss / 4, "code": loss * 1.5 + 10 * lr, "facts": 5 - loss}}


def _in_distribution(loss: float, lr: float) -> float:
    return (loss / 4 + loss * 1.5 + 10 * lr) / 2  # public and code: facts is validated in a shifted wording


def test_the_summary_picks_each_best_rate_and_counts_the_goal_bytes():
    runs = []
    for seed, noise in ((0, 0.0), (1, 0.02)):
        runs += [_run("adamw", 0.1, seed, 1.30 + noise), _run("adamw", 0.3, seed, 1.40 + noise),
                 _run("flexdemo", 0.03, seed, 1.80 + noise), _run("flexdemo", 0.1, seed, 1.70 + 2 * noise),
                 _run("flexdemo-q4", 0.03, seed, 1.75 + noise, value_bits=4)]
    s = bench_parity.summarise(runs, 1)
    assert (s["adamw"]["lr"], s["flexdemo"]["lr"]) == (0.1, 0.1)
    assert s["ratio"] == pytest.approx(1.72 / 1.31)
    # per domain: the best runs' final losses averaged over seeds, as the overall ratio (not the first seed's alone)
    assert s["ratio_by_domain"] == pytest.approx({"public": 1.72 / 1.31, "code": (1.72 * 1.5 + 1) / (1.31 * 1.5 + 1),
                                                  "facts": (5 - 1.72) / (5 - 1.31)})
    # on held-out text of the training distribution only, FlexDeMo's best rate is another (0.03: code favours it)
    i = s["in_distribution"]
    assert i["domains"] == ["public", "code"] and (i["adamw"]["lr"], i["flexdemo"]["lr"]) == (0.1, 0.03)
    f = (_in_distribution(1.80, 0.03) + _in_distribution(1.82, 0.03)) / 2
    a = (_in_distribution(1.30, 0.1) + _in_distribution(1.32, 0.1)) / 2
    assert i["flexdemo"]["ratio"] == pytest.approx(f / a)
    assert "(public, code; each at its best rate by that measure)" in bench_parity.table({1: s})
    assert s["flexdemo"]["lr_at_sweep_edge"] and not s["flexdemo-q4"]["lr_at_sweep_edge"]  # one rate: no sweep
    q = s["variants"]["flexdemo-q4"]["ratio_over_seeds"]
    assert q["n"] == 2 and q["mean"] == pytest.approx((1.75 / 1.30 + 1.77 / 1.32) / 2)
    # a variant against the default at its best rate, seed by seed (0.1 overall, 0.03 in distribution)
    q = s["variants"]["flexdemo-q4"]["over_default"]
    assert q["n"] == 2 and q["mean"] == pytest.approx((1.75 / 1.70 + 1.77 / 1.74) / 2)
    assert s["variants"]["flexdemo"]["over_default"] is None
    q = i["flexdemo-q4"]["over_default"]
    want = [_in_distribution(1.75 + n, 0.03) / _in_distribution(1.80 + n, 0.03) for n in (0.0, 0.02)]
    assert q["mean"] == pytest.approx(sum(want) / 2)
    assert f"× the default over 2 seeds {q['mean']:.3f}" in bench_parity.table({1: s})
    base = meta_model("base")
    want = {o: comm_row(base, cfg, 2, 2)["ratio_vs_dense_bf16"]
            for o, cfg in (("flexdemo", DeMoConfig(**DEMO_WIRE)), ("flexdemo-q4", DeMoConfig(**{**DEMO_WIRE, "value_bits": 4})))}
    for o, x in want.items():
        assert s["variants"][o]["base_2x2_x_dense_bf16"] == pytest.approx(x)
    assert want["flexdemo-q4"] > 1.5 * want["flexdemo"]  # 4-bit codes + a scale per chunk against bf16 values
    assert f"{want['flexdemo-q4']:.1f}×" in bench_parity.table({1: s})


def test_every_variant_is_a_valid_setting():
    """A variant's fields are DeMoConfig's or optim settings, and each validates at construction (a typo would
    otherwise fail only inside a run)."""
    for name, variant in bench_parity.VARIANTS.items():
        if variant is None:
            continue
        fields = {k: v for k, v in variant.items() if k not in bench_parity.OPTIM_KEYS}
        DeMoConfig(**fields)
        assert name.startswith(("flexdemo", "adamw")), name


def test_a_run_records_each_domain_at_each_evaluation(tmp_path, monkeypatch):
    """The worker's record: per-domain validation at every evaluation, whose mean is the curve the ratio reads (a
    domain that overfits can then be told apart from the optimizer)."""
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench_parity.py", "--worker", "--size", "tiny", "--optim", "flexdemo",
                                      "--lr", "0.01", "--set", "steps=4", "warmup=1", "eval_every=2", "eval_batches=1",
                                      "--run-dir", str(tmp_path / "run"), "--result", str(out)])
    monkeypatch.setitem(bench_parity.SIZES, "tiny", bench_parity.SIZES["tiny"])  # main() writes the overridden size
    bench_parity.main()
    r = json.loads(out.read_text())
    by = r["val_curve_by_domain"]
    assert sorted(int(s) for s in by) == [2, 4]
    for step, losses in by.items():
        assert set(losses) == set(bench_parity.SIZES["tiny"].domains)
        assert r["val_curve"][step] == pytest.approx(sum(losses.values()) / len(losses))
    assert r["val_by_domain"] == by["4"] and r["val_loss"] == r["val_curve"]["4"]
    # epochs over the tokens the training shards really hold (a domain may run out before its characters do)
    from flexmore.data import ByteTokenizer, TokenStream
    from flexmore.data.embedded import embedded_path

    size = bench_parity.SIZES["tiny"]
    held = TokenStream([embedded_path(d, "train", ByteTokenizer(), size.train_chars, 0) for d in size.domains])
    assert r["epochs"] == pytest.approx(4 * size.global_batch * size.seq_len / held.num_tokens)


def test_a_variant_defined_on_the_command_line_runs_as_the_default_with_its_fields(tmp_path, monkeypatch):
    """--define NAME=JSON: the worker trains the default's settings with those changed (an optim key and a DeMoConfig
    field here), and its record says so."""
    monkeypatch.setattr(bench_parity, "VARIANTS", dict(bench_parity.VARIANTS))
    monkeypatch.setitem(bench_parity.SIZES, "tiny", bench_parity.SIZES["tiny"])
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench_parity.py", "--worker", "--size", "tiny", "--optim", "flexdemo-probe",
                                      "--lr", "0.01", "--define",
                                      'flexdemo-probe={"min_lr_ratio": 0, "topk": 8, "warmup_steps": 2, "grad_clip": 0}',
                                      "--set", "steps=3", "warmup=1", "eval_every=3", "eval_batches=1",
                                      "--run-dir", str(tmp_path / "run"), "--result", str(out)])
    bench_parity.main()
    demo = dataclasses.asdict(DeMoConfig())
    settings = json.loads(out.read_text())["settings"]
    assert settings["min_lr_ratio"] == 0 and settings["demo"]["topk"] == 8
    assert settings["warmup_steps"] == 2 and settings["grad_clip"] == 0  # the size's warm-up 1 (--set) replaced
    assert {k: v for k, v in settings["demo"].items() if k not in ("topk", "weight_decay")} == \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in demo.items() if k not in ("topk", "weight_decay")}
    assert bench_parity.sweep_family("flexdemo-probe") == "flexdemo"


@pytest.mark.parametrize("spec, said", [
    ('flexdemo-x={"min_lr_ratio": 2}', "min_lr_ratio=2"),
    ('flexdemo-x={"topk": 0}', "topk=0"),
    ('flexdemo-x={"warmup_steps": -1}', "warmup_steps=-1"),
    ('flexdemo-x={"top_k": 8}', "unknown setting(s) top_k"),
    ("flexdemo-x={topk: 8}", "is not JSON"),
    ("flexdemo-x=[1]", "must be a JSON object"),
    ('flexdemo={"topk": 8}', "a new NAME"),
    ('adamw-x={"min_lr_ratio": 0}', "starting 'flexdemo-'"),
    ("flexdemo-x", "NAME=JSON"),
])
def test_a_bad_definition_fails_before_any_run_naming_it(spec, said, monkeypatch):
    monkeypatch.setattr(bench_parity, "VARIANTS", dict(bench_parity.VARIANTS))
    with pytest.raises(SystemExit, match=re.escape(said)):
        bench_parity.define_variants([spec])
    assert "flexdemo-x" not in bench_parity.VARIANTS
