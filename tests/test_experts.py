"""FlexMoRE: upcycle and train experts against a frozen base, extract low-rank experts, merge, opt out."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from flexmore.experts.artifact import base_hash, load_artifact, save_artifact
from flexmore.experts.extract import extract_lowrank
from flexmore.experts.merge import merge, opt_out, reroute
from flexmore.experts.training import frozen_hash, train_expert
from flexmore.experts.upcycle import expert_config, upcycle
from flexmore.model.experts import LowRankSwiGLU, break_even_rank
from flexmore.model.moe import bias_to_raw
from flexmore.store.modeldir import load_model
from flexmore.train.loop import train


def expert_cfg(tmp, base, name, kind, domain, ranks=(4,), steps=8, **train_kw):
    cfg = tiny_config(tmp / name, data={"domains": [domain]}, train={"steps": steps, **train_kw}, optim={"lr": 1e-2})
    cfg.expert.base, cfg.expert.name, cfg.expert.kind, cfg.expert.ranks = str(base), name, kind, list(ranks)
    cfg.expert.router_init_batches = 2
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny public base, and two experts trained against it in separate processes (as two data owners would)."""
    tmp = tmp_path_factory.mktemp("experts")
    train(tiny_config(tmp / "base", train={"steps": 20}))
    base = tmp / "base" / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for name, kind, domain in (("math", "full", "math"), ("facts", "lowrank", "facts")):
        args = [sys.executable, "-m", "flexmore.cli.train", "experiment=smoke", "train.steps=6", f"expert.base={base}",
                f"expert.name={name}", f"expert.kind={kind}", "expert.ranks=[4]", f"data.domains=[{domain}]",
                "data.val_domains=[public]", "expert.router_init_batches=2", f"hydra.run.dir={tmp / name}"]
        done = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return tmp, base


def test_lowrank_expert_at_b_zero_equals_the_base(world):
    _, base_dir = world
    base = load_model(base_dir)
    cfg = expert_config(base.cfg, "x", "lowrank", [3])
    rows = torch.randn(base.cfg.n_layers, base.cfg.d_model)
    model = load_state(cfg, upcycle(base, cfg, rows, -rows))
    x = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-5, atol=1e-5)
    assert isinstance(model.blocks[0].ffn.experts[1], LowRankSwiGLU)


def load_state(cfg, sd):
    from flexmore.model import build_model

    m = build_model(cfg)
    m.load_state_dict(sd)
    return m


def test_training_freezes_everything_but_the_expert(world, tmp_path):
    tmp, base_dir = world
    res = train_expert(expert_cfg(tmp_path, base_dir, "m2", "lowrank", "math", steps=3))
    trainable = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert trainable and all((".experts.1." in n or "router.experts" in n or "bias_raw" in n) for n in trainable)
    # AdamW holds state for the trainable tensors only
    assert len(res.optimizer.state) == len(trainable)
    # every frozen tensor is bit-identical to the base: the hash of the frozen part is the base's hash
    base = load_model(base_dir)
    assert frozen_hash(res.model.state_dict()) == base_hash(base.state_dict())
    tensors, man = load_artifact(res.artifact)
    assert man.base_hash == base_hash(base.state_dict()) and man.kind == "lowrank" and man.ranks == [4, 4, 4]
    assert not any(k.startswith("blocks.") for k in tensors)  # only the expert's own tensors
    assert man.params == sum(p.numel() for n, p in res.model.named_parameters() if n in trainable)


def mixture_reference(base, artifacts, x, layer=0):
    """sum_e softmax(logits)_e FFN_e(x) for one layer, from the base and the artifacts' raw tensors."""
    sd = base.state_dict()
    pre = f"blocks.{layer}.ffn.experts.0."
    W = {p: sd[pre + f"{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}

    def ffn(w):
        return torch.nn.functional.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T) @ w["down_proj"].T

    outs, logits = [ffn(W)], [x @ artifacts[0][0][f"layers.{layer}.router_public"]]
    for t, man in artifacts:
        w = {}
        for p in W:
            if f"layers.{layer}.{p}.weight" in t:
                w[p] = t[f"layers.{layer}.{p}.weight"]
            else:
                w[p] = W[p] + t[f"layers.{layer}.{p}.B"] @ t[f"layers.{layer}.{p}.A"]
        outs.append(ffn(w))
        logits.append(x @ t[f"layers.{layer}.router"] + t[f"layers.{layer}.bias"])
    probs = torch.stack(logits, -1).softmax(-1)
    return sum(probs[..., e : e + 1] * o for e, o in enumerate(outs))


def test_merge_of_separately_trained_experts_is_the_documented_mixture(world):
    tmp, base_dir = world
    arts = [tmp / "math" / "expert", tmp / "facts" / "expert"]
    merged = merge(base_dir, arts)
    assert merged.cfg.expert_names == ["public", "math", "facts"] and merged.cfg.top_k == 3
    assert merged.cfg.expert_kinds == ["full", "full", "lowrank"]
    base = load_model(base_dir)
    x = torch.randn(5, base.cfg.d_model)
    with torch.no_grad():
        got, _ = merged.blocks[0].ffn(x)
        want = mixture_reference(base, [load_artifact(a) for a in arts], x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_opt_out_drops_exactly_that_expert(world):
    tmp, base_dir = world
    both = merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"])
    only_facts = merge(base_dir, [tmp / "facts" / "expert"])
    dropped = opt_out(both, ["math"])
    assert dropped.cfg.expert_names == ["public", "facts"] and dropped.cfg.num_experts == 2
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(dropped(x).logits, only_facts(x).logits, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(dropped(x).logits, both(x).logits)
    with pytest.raises(ValueError, match=r"cannot opt out \['poetry'\]: no such expert; experts are \['public', 'math', 'facts'\]"):
        opt_out(both, ["poetry"])
    with pytest.raises(ValueError, match="public expert 'public' cannot be opted out"):
        opt_out(both, ["public"])


def test_renormalised_top_k_makes_an_unchosen_expert_invisible_to_opt_out(world):
    """With top-k renormalised, opting out an expert that no token ranks in its top-k leaves every output as it
    was; with FlexOlmo's every-expert softmax the same opt-out moves every token."""
    tmp, base_dir = world
    both = merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"])
    with torch.no_grad():  # plant a router that never ranks math (expert 1) above the other two
        for blk in both.blocks:
            blk.ffn.bias_raw.copy_(bias_to_raw(torch.tensor([-5.0, -0.5])))
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        for k in (1, 2):
            routed = reroute(both, k, renormalize=True)
            assert routed.cfg.top_k == k and routed.cfg.norm_topk_prob
            # the same experts and weights up to rounding (the softmax is over 2 experts instead of 3)
            torch.testing.assert_close(opt_out(routed, ["math"])(x).logits, routed(x).logits, rtol=0, atol=1e-5)
        assert (opt_out(both, ["math"])(x).logits - both(x).logits).abs().max() > 1e-4
        # the top-k of all experts, renormalised, is the unrenormalised every-expert model
        torch.testing.assert_close(reroute(both, 3, renormalize=True)(x).logits, both(x).logits)
    with pytest.raises(ValueError, match=r"top_k=4: the model has 3 experts; allowed 1..3"):
        reroute(both, 4, renormalize=True)


def test_prefix_routing_gives_each_sequence_its_experts_two_expert_model(world):
    """route_context="prefix" / "sequence": with facts never preferred (its bias far below), the three-expert
    mixture is the math expert's own two-expert model, and opting facts out changes nothing."""
    tmp, base_dir = world
    alone = merge(base_dir, [tmp / "math" / "expert"])
    both = merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"])
    with torch.no_grad():
        for blk, own in zip(both.blocks, alone.blocks):
            blk.ffn.bias_raw.copy_(torch.cat([own.ffn.bias_raw, bias_to_raw(torch.tensor([-40.0]))]))
    x = torch.randint(0, 256, (2, 11))
    for context in ("prefix", "sequence"):
        routed = reroute(both, context=context)
        with torch.no_grad():
            torch.testing.assert_close(routed(x).logits, alone(x).logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(opt_out(routed, ["facts"])(x).logits, routed(x).logits, rtol=0, atol=1e-6)
    allowed = "token, prefix, sequence, likelihood, posterior"
    with pytest.raises(ValueError, match=f"route_context='document'; allowed: {allowed}"):
        dataclasses.replace(both.cfg, route_context="document")
    from flexmore.experts.hf import export_hf

    for context in ("prefix", "sequence", "likelihood", "posterior"):
        with pytest.raises(ValueError, match=f"route_context='{context}': transformers' FlexOlmo routes each token"):
            export_hf(reroute(both, context=context), tmp / f"hf-{context}", bias="drop")
        assert not (tmp / f"hf-{context}").exists()


def test_prefix_choice_is_the_most_router_probability_so_far(world):
    """The prefix rule against a loop over each row's tokens: the non-public expert with the most router
    probability summed over the real tokens so far; the KV cache's running sums give the same choice."""
    from flexmore.model.layers import KVCache

    tmp, base_dir = world
    ffn = reroute(merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"]), context="prefix").blocks[0].ffn
    g = torch.Generator().manual_seed(3)
    B, T, E = 3, 9, 3
    logits = torch.randn(B * T, E, generator=g) * 2
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    weights, ids = ffn.prefix_routing(logits, B, valid, None)
    lg = logits.view(B, T, E)
    for b in range(B):
        for t in range(T):
            real = [s for s in range(t + 1) if valid[b, s]]
            mass = [sum(float(torch.softmax(lg[b, s], 0)[e]) for s in real) for e in (1, 2)]
            want = 1 + max(range(2), key=lambda i: (mass[i], -i))
            assert ids.view(B, T, 2)[b, t].tolist() == [0, want]
            two = torch.softmax(torch.stack([lg[b, t, 0], lg[b, t, want]]), 0)
            torch.testing.assert_close(weights.view(B, T, 2)[b, t], two)
    cache = KVCache(1)
    first = ffn.prefix_routing(lg[:, :5].reshape(-1, E), B, valid[:, :5], (cache, 0))[1]
    rest = ffn.prefix_routing(lg[:, 5:].reshape(-1, E), B, valid[:, 5:], (cache, 0))[1]
    assert torch.equal(torch.cat([first.view(B, 5, 2), rest.view(B, 4, 2)], 1), ids.view(B, T, 2))


def padded_tokens(seed: int, B: int, T: int, row: int, pad: int):
    """Random byte tokens (B, T), row ``row`` left-padded by ``pad``: (tokens, real-token mask, the generator)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[row, :pad] = False
    return x, valid, g


def scored_by_each(models, xs):
    """Each model's log-probabilities (M, t, V) on one row of real tokens, and log p(x_s | x_<s) (M, t), 0 at s = 0."""
    logp = torch.stack([torch.log_softmax(m(xs).logits[0].double(), -1) for m in models])
    gains = torch.zeros(len(models), xs.shape[1], dtype=torch.float64)
    gains[:, 1:] = logp[:, :-1].gather(-1, xs[0, 1:].expand(len(models), -1)[..., None]).squeeze(-1)
    return logp, gains


def test_sequence_choice_is_the_most_router_probability_over_all_layers_so_far(world):
    """route_context="sequence" against a loop: for each row and token, the token-routed mixture run on that row's
    real tokens up to it, its router probabilities (captured per layer) summed over layers and tokens; the choice is
    the non-public expert with the most, and every layer of that token uses it with the public expert."""
    tmp, base_dir = world
    token = merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"])
    seq = reroute(token, context="sequence")
    captured = []
    for blk in token.blocks:
        def grab(x, present=None, _orig=blk.ffn.router_logits):
            out = _orig(x, present)
            captured.append(torch.softmax(out, -1))
            return out
        blk.ffn.router_logits = grab
    chosen = []
    original = seq.sequence_choice
    seq.sequence_choice = lambda *a: chosen.append(original(*a)) or chosen[-1]
    B, T = 3, 10
    x, valid, _ = padded_tokens(4, B, T, row=2, pad=4)
    with torch.no_grad():
        out = seq(x, attention_mask=valid).logits
        ids = chosen[0].view(B, T)
        for b in range(B):
            real = valid[b].nonzero().squeeze(1)
            captured.clear()
            token(x[b : b + 1, real])
            mass = torch.stack(captured).sum(0)[:, 1:].cumsum(0)  # (tokens, E - 1): over layers, then tokens
            want = mass.argmax(-1) + 1
            assert ids[b, real].tolist() == want.tolist()
    assert len(set(ids[valid].tolist())) == 2  # both experts are chosen somewhere: the rule is exercised
    # every layer of a token uses the public expert and its choice: where a row chose e at every token so far, its
    # logits are those of e's choice forced everywhere (attention sees the earlier tokens, so only there)
    for e in (1, 2):
        pair = reroute(token, context="sequence")
        pair.sequence_choice = lambda *a, _e=e: torch.full((B * T,), _e)
        with torch.no_grad():
            forced = pair(x, attention_mask=valid).logits
        same = ((ids == e) | ~valid).int().cumprod(1).bool() & valid
        assert same.any()
        torch.testing.assert_close(out[same], forced[same], rtol=1e-5, atol=1e-5)


def test_likelihood_routing_takes_each_token_from_the_two_expert_model_that_predicted_its_prefix_best(world):
    """route_context="likelihood" against a loop over each row's real tokens: every expert's own two-expert model
    (the merged model with the other expert opted out) scores the tokens so far; each token's logits are those of
    the model with the highest log-likelihood (ties: the first). An expert that no token chooses can be opted out
    without changing anything, and an opted-out expert is never chosen."""
    tmp, base_dir = world
    token = merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"])
    routed = reroute(token, context="likelihood")
    two = {1: opt_out(token, ["facts"]), 2: opt_out(token, ["math"])}
    B, T = 4, 12
    x, valid, g = padded_tokens(5, B, T, row=2, pad=4)
    chosen = torch.zeros(B, T, dtype=torch.long)
    with torch.no_grad():
        out = routed(x, attention_mask=valid).logits
        for b in range(B):
            real = valid[b].nonzero().squeeze(1)
            xs = x[b : b + 1, real]
            own = {e: m(xs).logits[0] for e, m in two.items()}
            for t in range(len(real)):
                score = {e: sum(float(torch.log_softmax(lg[s - 1], -1)[xs[0, s]]) for s in range(1, t + 1))
                         for e, lg in own.items()}
                e = max(score, key=lambda k: (score[k], -k))
                chosen[b, real[t]] = e
                torch.testing.assert_close(out[b, real[t]], own[e][t], rtol=1e-4, atol=1e-4)
        assert set(chosen[valid].tolist()) == {1, 2}  # both are chosen somewhere: the rule is exercised
        # facts opted out: only math's model is left, everywhere
        torch.testing.assert_close(opt_out(routed, ["facts"])(x).logits, two[1](x).logits, rtol=1e-4, atol=1e-4)
        # opting out through ``present_rows`` (per row) never chooses the absent expert
        present = torch.ones(B, 3, dtype=torch.bool)
        present[0, 2] = False
        got = routed(x, attention_mask=valid, present_rows=present).logits
        torch.testing.assert_close(got[0], two[1](x[:1]).logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1:][valid[1:]], out[1:][valid[1:]], rtol=0, atol=0)
    # text that facts' model writes itself (greedy), which math's model (its FFN made random) predicts poorly: after
    # the first token (no evidence: a tie, to the first) nothing chooses math, so opting it out changes no other token
    with torch.no_grad():
        for blk in routed.blocks:
            for prm in blk.ffn.experts[1].parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
        text = x[:, :1]
        for _ in range(T - 1):
            text = torch.cat([text, two[2](text).logits[:, -1:].argmax(-1)], 1)
        out = routed(text).logits
        rest = opt_out(routed, ["math"])(text).logits
    torch.testing.assert_close(rest[:, 1:], out[:, 1:], rtol=0, atol=1e-5)
    assert (rest[:, 0] - out[:, 0]).abs().max() > 1e-3  # the first token did use math
    with pytest.raises(ValueError, match="route_context='likelihood' evaluates a merged mixture; train with"):
        routed(x, route_targets=torch.zeros(B, dtype=torch.long))


def test_posterior_routing_is_the_bayesian_mixture_of_the_two_expert_models(world):
    """route_context="posterior" against a loop: each token's log-probabilities are log sum_e w_e p_e, p_e from each
    expert's own two-expert model and w = softmax over e of its log-likelihood of the real tokens so far; the
    sequence's log-likelihood is then within log 2 of its better model's."""
    tmp, base_dir = world
    token = merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"])
    routed = reroute(token, context="posterior")
    two = [opt_out(token, ["facts"]), opt_out(token, ["math"])]
    B, T = 3, 10
    x, valid, _ = padded_tokens(6, B, T, row=1, pad=3)
    with torch.no_grad():
        out = routed(x, attention_mask=valid).logits
        for b in range(B):
            real = valid[b].nonzero().squeeze(1)
            xs = x[b : b + 1, real]
            logp, gains = scored_by_each(two, xs)
            w = torch.softmax(gains.cumsum(1), 0)  # (2, t)
            want = torch.log((w[..., None] * logp.exp()).sum(0))
            torch.testing.assert_close(torch.log_softmax(out[b, real].double(), -1), want, rtol=1e-4, atol=1e-4)
            mix = float(torch.log_softmax(out[b, real[:-1]], -1).gather(-1, xs[0, 1:, None]).sum())
            best = float(gains.sum(1).max())
            assert best - math.log(2) - 1e-3 <= mix <= best + 1e-3


@pytest.mark.parametrize("rule", ["likelihood", "posterior"])
def test_route_evidence_counts_only_the_marked_tokens(world, rule):
    """``route_evidence`` (what multiple-choice scoring marks: the context) against a loop: each two-expert model's
    score sums log p_e(x_t | x_<t) over the marked real tokens only, so after the last marked token the choice (or
    the posterior's weights) stays what the context made it, whatever the following tokens are."""
    tmp, base_dir = world
    routed = reroute(merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"]), context=rule)
    two = [opt_out(routed, ["facts"]), opt_out(routed, ["math"])]
    B, T = 3, 14
    x, valid, _ = padded_tokens(7, B, T, row=1, pad=3)
    marked = [4, 6, 14]  # real tokens that count, per row (the last: all of them)
    first = (~valid).sum(1)
    evidence = torch.arange(T)[None] < (first + torch.tensor(marked))[:, None]
    with torch.no_grad():
        out = routed(x, attention_mask=valid, route_evidence=evidence).logits
        assert not torch.allclose(out, routed(x, attention_mask=valid).logits)  # the marking changes something
        for b in range(B):
            real = valid[b].nonzero().squeeze(1)
            xs = x[b : b + 1, real]
            logp, gains = scored_by_each(two, xs)
            gains[:, marked[b]:] = 0.0
            score = gains.cumsum(1)
            if rule == "likelihood":
                pick = (score[1] > score[0]).long()  # ties to the first
                want = logp[pick, torch.arange(len(real))]
            else:
                want = torch.log((torch.softmax(score, 0)[..., None] * logp.exp()).sum(0))
            torch.testing.assert_close(torch.log_softmax(out[b, real].double(), -1), want, rtol=1e-4, atol=1e-4)


def test_choices_are_scored_by_the_two_expert_model_their_context_chose(world):
    """Multiple-choice scoring (``evidence="context"``) of a mixture routed by likelihood: every continuation is
    scored by the one two-expert model that gave its context the highest likelihood, the same for every choice."""
    from flexmore.data import ByteTokenizer
    from flexmore.eval.generate import request_logprobs

    tmp, base_dir = world
    routed = reroute(merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"]), context="likelihood")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # math's FFN made random: facts' model wins any context with evidence
        for blk in routed.blocks:
            for prm in blk.ffn.experts[1].parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
    two = [opt_out(routed, ["facts"]), opt_out(routed, ["math"])]
    tok, cpu = ByteTokenizer(), torch.device("cpu")
    contexts = ["Problem: Compute 3 + 4.", "Kelvor Dun was born in", "Q"]  # "Q": no evidence, a tie, to math
    reqs = [(c, cont) for c in contexts for cont in (" 7", " the city of Ardun", " qzx 9!")]
    got = request_logprobs(routed, tok, reqs, cpu, batch_size=5, evidence="context")
    chose = []
    for (c, cont), (lp, n) in zip(reqs, got):
        fit = [request_logprobs(m, tok, [(c[0], c[1:])], cpu)[0][0] if len(c) > 1 else 0.0 for m in two]
        chosen = two[int(fit[1] > fit[0])]  # ties (a one-token context: no evidence) to the first
        want, m = request_logprobs(chosen, tok, [(c, cont)], cpu)[0]
        assert n == m and lp == pytest.approx(want, abs=1e-4)
        chose.append(int(fit[1] > fit[0]))
    assert set(chose) == {0, 1}  # each model chosen for some context
    # every token as evidence instead: after "Q" the continuation's own tokens choose, and the score changes
    assert abs(request_logprobs(routed, tok, reqs[-1:], cpu)[0][0] - got[-1][0]) > 0.1
    with pytest.raises(ValueError, match="evidence='prompt': one of all, context, item"):
        request_logprobs(routed, tok, reqs, cpu, evidence="prompt")


@pytest.mark.parametrize("rule", ["likelihood", "posterior"])
def test_item_evidence_scores_every_choice_with_the_model_the_whole_item_chose(world, rule):
    """``evidence="item"`` (multiple choice's default) against each two-expert model alone: the requests sharing a
    context are scored by the model with the highest likelihood of the context and every continuation together
    (posterior: the models weighted by softmax of it), the same for every choice, so a question with no evidence of
    its own is routed by its choices' words."""
    from flexmore.data import ByteTokenizer
    from flexmore.eval.generate import request_logprobs

    tmp, base_dir = world
    routed = reroute(merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"]), context=rule)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # math's FFN made random: facts' model wins text with evidence
        for blk in routed.blocks:
            for prm in blk.ffn.experts[1].parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
    two = [opt_out(routed, ["facts"]), opt_out(routed, ["math"])]
    tok, cpu = ByteTokenizer(), torch.device("cpu")
    items = {"Problem: Compute 3 + 4.": [" 7", " 12"], "Q": [" the city of Ardun", " Kelvor Dun", " Mira Sel"],
             "Kelvor Dun was born in": [" the city of Ardun", " qzx 9!"]}
    reqs = [(c, cont) for c, conts in items.items() for cont in conts]
    reqs = reqs[3:] + reqs[:3]  # an item's requests need not be adjacent
    got = request_logprobs(routed, tok, reqs, cpu, batch_size=3, evidence="item")
    cont = torch.tensor([[request_logprobs(m, tok, [r], cpu)[0][0] for r in reqs] for m in two], dtype=torch.float64)
    for c in items:
        rows = [i for i, r in enumerate(reqs) if r[0] == c]
        ctx = torch.tensor([request_logprobs(m, tok, [(c[0], c[1:])], cpu)[0][0] if len(c) > 1 else 0.0 for m in two],
                           dtype=torch.float64)
        score = ctx + cont[:, rows].sum(1)
        for i in rows:
            if rule == "likelihood":
                e = int(score[1] > score[0])  # ties to the first
                want = float(cont[e, i])
            else:
                want = float(torch.logsumexp(cont[:, i] + torch.log_softmax(score, 0), 0))
            assert got[i][1] == len(tok.encode(reqs[i][1])) and got[i][0] == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match="pair_logprobs needs a mixture routed by likelihood; route_context='token'"):
        merge(base_dir, [tmp / "math" / "expert"]).pair_logprobs(torch.zeros(1, 4, dtype=torch.long))
    # "Q" carries no evidence: routed by the question alone it ties to math's model; its choices' names pick facts'
    by_context = request_logprobs(routed, tok, reqs, cpu, evidence="context")
    q = [i for i, r in enumerate(reqs) if r[0] == "Q"]
    assert all(abs(got[i][0] - by_context[i][0]) > 0.1 for i in q)


def test_extraction_full_rank_is_exact_and_error_falls_with_rank(world, tmp_path):
    tmp, base_dir = world
    from flexmore.cli.lowrank import public_ffn

    base = load_model(base_dir)
    tensors, man = load_artifact(tmp / "math" / "expert")
    d, f, L = base.cfg.d_model, base.cfg.d_ffn, base.cfg.n_layers
    errors = []
    for r in (1, 2, 4, 8, 16, 32):
        _, _, rows = extract_lowrank(public_ffn(base, L), tensors, L, [r, r, r])
        errors.append(max(x.rel_error for x in rows if x.projection == "gate_proj"))
        assert all(x.dense == (r >= break_even_rank(f, d)) for x in rows if x.projection == "gate_proj")
    assert all(a > b for a, b in zip(errors, errors[1:])) and 0 < errors[-1] < 0.5 * errors[0]
    full, dense, rows = extract_lowrank(public_ffn(base, L), tensors, L, [d, d, d])  # >= min(d, f): exact
    assert dense == ["gate_proj", "up_proj", "down_proj"] and all(x.rel_error == 0 for x in rows)
    out = save_artifact(tmp_path / "exact", full, dataclasses.replace(man, name="exact", kind="lowrank", ranks=[d, d, d]))
    a = merge(base_dir, [tmp / "math" / "expert"])
    b = merge(base_dir, [out])
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(b(x).logits, a(x).logits, rtol=1e-6, atol=1e-6)


def test_cli_extract_then_merge_a_rank_heterogeneous_mixture(world, tmp_path, capsys):
    tmp, base_dir = world
    from flexmore.cli.lowrank import main as lowrank
    from flexmore.cli.merge import main as merge_cli

    assert lowrank(["--base", str(base_dir), "--expert", str(tmp / "math" / "expert"), "--ranks", "2", "8",
                    "64", "--refit-steps", "0", "--out", str(tmp_path / "low")]) == 0
    out = capsys.readouterr().out
    assert "dense (past break-even)" in out and "factors A, B" in out
    report = json.loads((tmp_path / "low" / "report.json").read_text())
    assert {r["rank"] for r in report} == {2, 8, 64}
    # the owner's refit: the same extraction with only router rows and biases re-fitted; bad input named, nothing written
    args = ["--base", str(base_dir), "--expert", str(tmp / "math" / "expert"), "--ranks", "2"]
    other = tmp_path / "refit" / ".extracted"  # another run's staging in the same --out, at the same time: kept
    other.mkdir(parents=True)
    (other / "x").write_text("theirs")
    assert lowrank(args + ["--refit-steps", "3", "--seq-len", "32", "--max-seqs", "8", "--out",
                           str(tmp_path / "refit")]) == 0
    assert (other / "x").read_text() == "theirs"
    shutil.rmtree(other)
    plain, (tuned, man) = load_artifact(tmp_path / "low" / "math-r2")[0], load_artifact(tmp_path / "refit" / "math-r2")
    changed = {k for k in plain if not torch.equal(plain[k], tuned[k])}
    assert changed and all(k.endswith((".router", ".bias")) for k in changed)
    assert man.training["router_refit"]["samples"] == {"public": 8, "math-r2": 8}
    assert sorted(p.name for p in (tmp_path / "refit").iterdir()) == ["math-r2", "report.json"]  # no staging left
    # an artifact already there is named before any work, and kept as it was
    before = (tmp_path / "refit" / "math-r2" / "expert.safetensors").read_bytes()
    assert lowrank(args + ["--ranks", "2", "8", "--refit-steps", "3", "--out", str(tmp_path / "refit")]) == 2
    assert "math-r2 already exist(s); pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "refit" / "math-r2" / "expert.safetensors").read_bytes() == before
    assert not (tmp_path / "refit" / "math-r8").exists()
    assert lowrank(args + ["4", "4", "--refit-steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--ranks names one rank twice" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert lowrank(args + ["--refit-steps", "-2", "--out", str(tmp_path / "bad")]) == 2
    assert "--refit-steps=-2 must be >= 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert lowrank(args + ["--refit-steps", "3", "--max-seqs", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--max-seqs=0 must be in [1, 4096]" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert lowrank(args + ["--refit-steps", "3", "--seq-len", "99999", "--out", str(tmp_path / "bad")]) == 2
    assert "--seq-len=99999 must be in [1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert merge_cli(["--base", str(base_dir), "--experts", str(tmp_path / "low" / "math-r2"),
                      str(tmp / "facts" / "expert"), "--top-k", "2", "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert merged.cfg.expert_ranks == [[], [2, 2, 2], [4, 4, 4]] and merged.cfg.top_k == 2
    assert merge_cli(["--merged", str(tmp_path / "merged"), "--drop", "facts", "--out", str(tmp_path / "m2")]) == 0
    assert load_model(tmp_path / "m2").cfg.expert_names == ["public", "math-r2"]
    assert merge_cli(["--merged", str(tmp_path / "merged"), "--drop", "nobody", "--out", str(tmp_path / "m3")]) == 2
    assert "no such expert" in capsys.readouterr().err and not (tmp_path / "m3").exists()
    # a routing rule written into the folder: it loads with the rule and gives reroute's logits
    assert merge_cli(["--merged", str(tmp_path / "merged"), "--route-context", "sequence", "--out",
                      str(tmp_path / "seq")]) == 0
    assert "routed by sequence" in capsys.readouterr().out
    seq = load_model(tmp_path / "seq")
    assert seq.cfg.route_context == "sequence" and seq.cfg.top_k == 2
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(seq(x).logits, reroute(merged, context="sequence")(x).logits, rtol=0, atol=0)
        assert not torch.allclose(seq(x).logits, merged(x).logits)
    assert merge_cli(["--merged", str(tmp_path / "merged"), "--renormalize", "--out", str(tmp_path / "renorm")]) == 0
    assert load_model(tmp_path / "renorm").cfg.norm_topk_prob
    with pytest.raises(SystemExit):  # argparse names the allowed rules before anything is read
        merge_cli(["--merged", str(tmp_path / "merged"), "--route-context", "document", "--out", str(tmp_path / "m4")])
    err = capsys.readouterr().err
    assert "invalid choice: 'document'" in err
    assert all(c in err for c in ("token", "prefix", "sequence", "likelihood", "posterior"))
    assert not (tmp_path / "m4").exists()


def test_bad_artifacts_are_rejected_with_the_artifact_named(world, tmp_path):
    tmp, base_dir = world
    art = tmp / "facts" / "expert"
    tensors, man = load_artifact(art)
    # trained against another base
    other = save_artifact(tmp_path / "other", tensors, dataclasses.replace(man, base_hash="0" * 64))
    with pytest.raises(ValueError, match=f"expert artifact {other} \\('facts'\\) was trained against another base"):
        merge(base_dir, [tmp / "math" / "expert", other])
    # ranks that do not match the stored factors
    wrong = save_artifact(tmp_path / "wrong", tensors, dataclasses.replace(man, ranks=[5, 4, 4]))
    with pytest.raises(ValueError, match="rank mismatch for gate_proj"):
        merge(base_dir, [wrong])
    with pytest.raises(ValueError, match=r"ranks=\[0, 4, 4\]; need three ranks >= 1"):  # no such manifest is made
        dataclasses.replace(man, ranks=[0, 4, 4])
    import shutil

    bad = tmp_path / "neg"  # nor read: a hand-edited one names the artifact
    shutil.copytree(wrong, bad)
    (bad / "manifest.json").write_text(json.dumps({**man.to_json(), "ranks": [0, 4, 4]}))
    with pytest.raises(ValueError, match=f"expert artifact {bad}: ranks=\\[0, 4, 4\\]; need three ranks >= 1"):
        merge(base_dir, [bad])
    # corrupt manifests
    broken = tmp_path / "broken"
    shutil.copytree(art, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest.json"):
        merge(base_dir, [broken])
    (broken / "manifest.json").write_text(json.dumps({"format": "flexmore-expert", "name": "x"}))
    with pytest.raises(ValueError, match="missing"):
        load_artifact(broken)


def test_bad_expert_settings_fail_at_config(tmp_path):
    from flexmore.config import ExpertConfig

    with pytest.raises(ValueError, match=r"expert.ranks=\[0\]: need whole ranks >= 1"):
        ExpertConfig(base="x", ranks=[0])
    with pytest.raises(ValueError, match="expert.kind='huge'"):
        ExpertConfig(base="x", kind="huge")
    with pytest.raises(FileNotFoundError, match="no model or checkpoint found"):
        train_expert(expert_cfg(tmp_path, tmp_path / "nothing", "e", "full", "math"))
    with pytest.raises(ValueError, match="expert.base is set but no recipe was given"):
        train(expert_cfg(tmp_path, tmp_path / "nothing", "e", "full", "math"))


def test_expert_run_takes_seq_len_limit_from_the_base(world, tmp_path):
    """The model of an expert run is the base's: the default model's max_seq_len does not apply, the base's does."""
    from flexmore.config import Config, ExpertConfig, TrainConfig

    with pytest.raises(ValueError, match="larger than the model's max_seq_len=256"):
        Config(train=TrainConfig(seq_len=512))
    Config(train=TrainConfig(seq_len=512), expert=ExpertConfig(base="somewhere"))  # judged against the base, later
    _, base = world
    cfg = expert_cfg(tmp_path, base, "e", "full", "math")
    cfg.train.seq_len = 512
    with pytest.raises(ValueError, match="train.seq_len=512 is larger than the base's max_seq_len=256"):
        train_expert(cfg)


def job_expert_under_hsdp(tmp: str, base: str) -> dict:
    """An expert trained with FSDP inside the "node" (adamw, 1 x 2) and with FlexDeMo across "nodes" (2 x 1)."""
    from flexmore.config import DeMoConfig, ParallelConfig

    out = {}
    for name, optim, mesh in (("fsdp", "adamw", ParallelConfig(replicate=1, shard=2)),
                              ("flexdemo", "flexdemo", ParallelConfig(replicate=2, shard=1))):
        cfg = expert_cfg(Path(tmp), base, name, "lowrank", "math", steps=4)
        cfg.optim.name, cfg.optim.demo, cfg.parallel = optim, DeMoConfig(chunk=16, topk=8), mesh
        res = train_expert(cfg)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(res.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        from flexdemo import local_tensor

        out[name] = {"frozen_hash": frozen_hash(full) if full else None, "artifact": str(res.artifact),
                     "expert": {k: local_tensor(p).detach().clone() for k, p in res.model.named_parameters()
                                if ".experts.1." in k}}
    return out


def test_expert_training_under_fsdp_and_flexdemo(world, tmp_path):
    from distributed import run_distributed_test

    tmp, base_dir = world
    ranks = run_distributed_test(job_expert_under_hsdp, 2, str(tmp_path), str(base_dir), local_world_size=2)
    base = load_model(base_dir)
    for name in ("fsdp", "flexdemo"):
        r0 = ranks[0][name]
        assert r0["frozen_hash"] == base_hash(base.state_dict()), name  # frozen tensors untouched
        tensors, man = load_artifact(r0["artifact"])
        assert man.base_hash == r0["frozen_hash"]
        assert any(v.abs().sum() > 0 for k, v in r0["expert"].items() if k.endswith(".B"))  # the expert trained
    # FlexDeMo replicas agree on the expert bit for bit
    for k, v in ranks[0]["flexdemo"]["expert"].items():
        assert torch.equal(v, ranks[1]["flexdemo"]["expert"][k]), k


def test_peft_export_of_a_lowrank_expert(world, tmp_path):
    from safetensors.torch import load_file

    from flexmore.experts.peft_export import export_peft

    tmp, _ = world
    out = export_peft(tmp / "facts" / "expert", tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == cfg["alpha_pattern"] == {
        "gate_proj": 4, "up_proj": 4, "down_proj": 4}
    w = load_file(out / "adapter_model.safetensors")
    tensors, _ = load_artifact(tmp / "facts" / "expert")
    assert torch.equal(w["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"], tensors["layers.1.up_proj.B"])
    with pytest.raises(ValueError, match="only low-rank experts export"):
        export_peft(tmp / "math" / "expert", tmp_path / "a2")


def test_olmo2_export_of_the_base_and_a_peft_adapter_on_it_load_in_transformers(world, tmp_path):
    """The public base as transformers' Olmo2ForCausalLM gives our logits; a low-rank expert's LoRA adapter on it,
    loaded by PEFT from the adapter folder alone (AutoPeftModelForCausalLM finds the base by its path), gives the
    logits of our base with that expert's FFN (W + B A in every layer)."""
    transformers = pytest.importorskip("transformers")
    from flexmore.experts.hf import export_olmo2
    from flexmore.experts.peft_export import export_peft
    from flexmore.model.experts import PROJECTIONS

    tmp, base_dir = world
    base = load_model(base_dir).eval()
    olmo2 = export_olmo2(base, tmp_path / "olmo2")
    ref = transformers.Olmo2ForCausalLM.from_pretrained(olmo2).eval()
    x = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, base(x).logits, rtol=1e-5, atol=1e-5)
    tensors, man = load_artifact(tmp / "facts" / "expert")  # B given a large value, so the adapter matters
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 if k.endswith(".B") else v for k, v in tensors.items()}
    adapter = export_peft(save_artifact(tmp_path / "facts-big", tensors, man), tmp_path / "adapter",
                          base_model_name_or_path=str(olmo2))
    peft = pytest.importorskip("peft")
    tuned = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    expect = load_model(base_dir).eval()
    with torch.no_grad():
        for i, block in enumerate(expect.blocks):
            for proj in PROJECTIONS:
                getattr(block.ffn.experts[0], proj).weight += tensors[f"layers.{i}.{proj}.B"] @ tensors[
                    f"layers.{i}.{proj}.A"]
        torch.testing.assert_close(tuned(x).logits, expect(x).logits, rtol=1e-4, atol=1e-4)
        assert (tuned(x).logits - ref(x).logits).abs().max() > 1e-2
    with pytest.raises(ValueError, match="export_olmo2 writes dense models; this one has 2 experts"):
        export_olmo2(merge(base_dir, [tmp / "math" / "expert"]), tmp_path / "no")
    from flexmore.cli.merge import main as merge_cli  # --hf on a dense model writes OLMo 2

    assert merge_cli(["--merged", str(base_dir), "--hf", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "olmo2"


def test_cli_tune_router_then_eval_shows_the_routing(world, tmp_path, capsys):
    tmp, base_dir = world
    from flexmore.cli.eval import main as eval_cli
    from flexmore.cli.merge import main as merge_cli
    from flexmore.cli.tune_router import main as tune_cli
    from flexmore.experts.router import frozen_part_hash, is_router
    from flexmore.store.modeldir import trained_info

    assert merge_cli(["--base", str(base_dir), "--experts", str(tmp / "math" / "expert"), str(tmp / "facts" / "expert"),
                      "--out", str(tmp_path / "merged")]) == 0
    args = ["--merged", str(tmp_path / "merged"), "--sample", "math=embedded:math", "facts=embedded:facts",
            "--seq-len", "32", "--steps", "4", "--micro-batch", "6", "--max-seqs", "16"]
    assert tune_cli(args + ["--out", str(tmp_path / "tuned")]) == 0
    merged, tuned = load_model(tmp_path / "merged"), load_model(tmp_path / "tuned")
    assert frozen_part_hash(merged) == frozen_part_hash(tuned)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert changed and all(is_router(k) for k in changed)
    meta = json.loads((tmp_path / "tuned" / "config.json").read_text())["router"]
    assert meta["method"] == "tuned" and meta["samples"] == {"public": 16, "math": 16, "facts": 16}
    assert meta["route_loss"] == 1.0 and meta["lr"] == 3e-3
    # the length the base was trained at goes with the merged and tuned models (flexmore-eval's default)
    assert trained_info(tmp_path / "tuned") == trained_info(tmp_path / "merged") == trained_info(base_dir) != {}
    assert tune_cli(args + ["--centroid", "--out", str(tmp_path / "centroid")]) == 0
    assert frozen_part_hash(load_model(tmp_path / "centroid")) == frozen_part_hash(merged)
    # bad input: named, nothing written
    assert tune_cli(["--merged", str(tmp_path / "merged"), "--sample", "poetry=embedded:math", "--seq-len", "32",
                     "--out", str(tmp_path / "bad")]) == 2
    assert "unknown: ['poetry']" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert tune_cli(args[:-2] + ["--max-seqs", "100000", "--out", str(tmp_path / "bad")]) == 2
    assert "--max-seqs=100000 must be in [1, 4096]" in capsys.readouterr().err
    assert tune_cli(args + ["--seq-len", "9999", "--out", str(tmp_path / "bad")]) == 2
    assert "--seq-len=9999" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert tune_cli(args + ["--route-loss", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "route_loss=-1.0 must be a finite number >= 0" in capsys.readouterr().err
    # flexmore-eval of a mixture writes the domain x expert routing table and heat-map
    assert eval_cli(["--model", str(tmp_path / "tuned"), "--tasks", "--val-domains", "public", "math",
                     "--val-batches", "1", "--seq-len", "32", "--out", str(tmp_path / "ev" / "res")]) == 0
    rows = json.loads((tmp_path / "ev" / "res_routing.json").read_text())
    assert {(r["domain"], r["expert"]) for r in rows} == {(d, e) for d in ("public", "math")
                                                          for e in ("public", "math", "facts")}
    for d in ("public", "math"):
        for layer in range(tuned.cfg.n_layers):
            assert abs(sum(r["prob"] for r in rows if r["domain"] == d and r["layer"] == layer) - 1) < 1e-5
    assert (tmp_path / "ev" / "res_routing.png").stat().st_size > 1000
    assert "router probability (mean over layers)" in capsys.readouterr().out


def test_routing_metrics_name_every_expert_and_layer():
    from flexmore.eval.routing import routing_metrics
    from flexmore.model import load_preset

    cfg = dataclasses.replace(load_preset("tiny"), num_experts=2, top_k=2, expert_names=["public", "math"])
    stats = {"layer_expert_prob": torch.tensor([[0.9, 0.1], [0.7, 0.3]]),
             "layer_expert_topk": torch.tensor([[1.0, 1.0], [1.0, 1.0]])}
    m = routing_metrics(stats, cfg)
    assert m["moe/math/prob"] == pytest.approx(0.2) and m["moe/L1/public/prob"] == pytest.approx(0.7)
    assert m["moe/public/topk"] == 1.0 and len(m) == 2 * 2 * 3


def test_lowrank_artifacts_from_the_cli_and_the_sweep_carry_the_same_manifest(world, tmp_path):
    """One function makes every low-rank artifact: the CLI's and the sweep's manifests agree field for field."""
    tmp, base_dir = world
    from flexmore.cli.lowrank import main as lowrank
    from flexmore.cli.lowrank import public_ffn
    from flexmore.experts.extract import save_lowrank

    assert lowrank(["--base", str(base_dir), "--expert", str(tmp / "math" / "expert"), "--ranks", "4",
                    "--refit-steps", "0", "--out", str(tmp_path / "cli")]) == 0
    base = load_model(base_dir)
    _, sweep_man, _ = save_lowrank(tmp_path / "sweep" / "math-r4", public_ffn(base, base.cfg.n_layers),
                                   *load_artifact(tmp / "math" / "expert"), base.cfg.n_layers, [4])
    cli_man = load_artifact(tmp_path / "cli" / "math-r4")[1]
    assert cli_man == sweep_man
    assert cli_man.ranks == [4, 4, 4] and cli_man.extracted_from == "math" and 0 < cli_man.energy <= 1
    assert cli_man.training == load_artifact(tmp / "math" / "expert")[1].training


def test_expert_on_your_own_shards_with_public_negatives_from_shards(world, tmp_path):
    """data=shards: the public negatives come from expert.public_paths; without them the run is refused at config."""
    from flexmore.config import Config
    from flexmore.data import ByteTokenizer, embedded_path

    _, base_dir = world
    tok = ByteTokenizer()
    mine, public = embedded_path("math", "train", tok, 60_000, 3), embedded_path("public", "train", tok, 60_000, 3)
    cfg = expert_cfg(tmp_path, base_dir, "own", "lowrank", "math", steps=3)
    data = dataclasses.replace(cfg.data, source="shards", paths=[str(mine)], val_paths={"own": str(mine)},
                               val_domains=[])
    with pytest.raises(ValueError, match="expert.public_fraction=0.25 with data=shards needs expert.public_paths"):
        Config(**{**cfg.__dict__, "data": data})
    cfg = Config(**{**cfg.__dict__, "data": data,
                    "expert": dataclasses.replace(cfg.expert, public_paths=[str(public)])})
    from flexmore.data import TokenStream
    from flexmore.experts.training import expert_loader

    loader = expert_loader(cfg, tok, TokenStream([mine]), 0, 1)  # what the run draws its batches from
    assert loader.extra.stream.paths == [public] and loader.main.stream.paths == [mine]
    assert loader.extra_rows == 1 == round(0.25 * cfg.train.micro_batch)
    res = train_expert(cfg)
    tensors, man = load_artifact(res.artifact)
    assert man.training["public_fraction"] == 0.25 and man.domain == str(mine)
    assert res.final_step == 3 and set(res.val[3]) == {"own"}
    # the refit's and the sweep's default sample is that shard folder, not an embedded domain of the same name
    from flexmore.experts.router import load_sample, own_sample_spec

    assert own_sample_spec(man.domain) == str(mine)
    assert torch.equal(load_sample(own_sample_spec(man.domain), tok, 16, 4), load_sample(str(mine), tok, 16, 4))
    assert own_sample_spec("math,code") == "embedded:math" and own_sample_spec("/gone/shards") == "/gone/shards"


def test_refit_router_keeps_everything_but_the_experts_row_and_lowers_its_loss(world, tmp_path):
    """An owner re-fits its compressed expert's router row: the public row and every weight stay bit for bit (so it
    still merges with the others), and the loss the refit minimises falls on its sample."""
    import torch.nn.functional as F

    from flexmore.cli.lowrank import public_ffn
    from flexmore.data import ByteTokenizer
    from flexmore.experts.extract import save_lowrank
    from flexmore.experts.refit import save_refit
    from flexmore.experts.router import TuneConfig, load_sample, tune_router

    tmp, base_dir = world
    base = load_model(base_dir)
    L = base.cfg.n_layers
    low = save_lowrank(tmp_path / "math-r2", public_ffn(base, L), *load_artifact(tmp / "math" / "expert"), L, [2])[0]
    tok = ByteTokenizer()
    own, pub = load_sample("embedded:math", tok, 32, 16), load_sample("embedded:public", tok, 32, 16)

    def loss(artifact) -> float:
        m = merge(base_dir, [artifact]).eval()
        with torch.no_grad():
            w = torch.cat([own, pub])
            lg = m(w[:, :-1]).logits
            return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1)).item()

    tc = TuneConfig(steps=30, micro_batch=8, lr=3e-2, route_loss=0.0)
    out = save_refit(base_dir, low, tmp_path / "math-r2-refit", own, pub, tc, torch.device("cpu"))
    before, after = load_artifact(low)[0], load_artifact(out)
    changed = {k for k in before if not torch.equal(before[k], after[0][k])}
    assert changed and all(k.endswith((".router", ".bias")) for k in changed)
    assert after[1].name == "math-r2-refit" and after[1].training["router_refit"]["route_loss"] == 0.0
    assert loss(out) < loss(low)
    assert merge(base_dir, [out, tmp / "facts" / "expert"]).cfg.num_experts == 3  # the public row is still shared
    # public_row=False in a mixture's tuning: the public rows stay, the experts' rows move
    m = merge(base_dir, [tmp / "math" / "expert", tmp / "facts" / "expert"])
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    tune_router(m, {"public": pub, "math": own, "facts": own}, dataclasses.replace(tc, steps=3, public_row=False),
                torch.device("cpu"), log=None)
    moved = {k for k, v in m.state_dict().items() if not torch.equal(v, sd[k])}
    assert moved and not any(k.endswith("router.public") for k in moved)


def test_sweep_refuses_bad_sample_settings_before_any_work(world, tmp_path, capsys):
    """--seq-len beyond the base's max_seq_len, --max-seqs outside [1, MAX_SEQS] and negative step counts are named
    before anything is extracted or written."""
    _, base_dir = world
    from flexmore.cli.sweep import main

    args = ["--base", str(base_dir), "--experts", str(base_dir.parent / "math" / "expert"), "--out",
            str(tmp_path / "o")]
    for extra, message in ((["--seq-len", "99999"], "--seq-len=99999 must be in [1, the model's max_seq_len="),
                           (["--max-seqs", "0"], "--max-seqs=0 must be in [1, "),
                           (["--tune-steps", "-3"], "--tune-steps=-3 must be >= 0")):
        assert main(args + extra) == 2, extra
        assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
