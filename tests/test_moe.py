"""FlexOlmo routing: softmax over all experts, top-k, no renormalisation, a bias b < 0 with a live gradient, aux
losses and routing statistics, rows where the experts are held fixed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexmore.model import MoEFFN, load_preset
from flexmore.model.moe import BIAS_FLOOR, bias_to_raw, raw_to_bias


def make(E=4, k=2, **kw) -> MoEFFN:
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_preset("tiny"), num_experts=E, top_k=k, **kw)
    moe = MoEFFN(cfg)
    moe.reset_parameters(0.2)  # large weights: routing probabilities far from uniform
    return moe.double()  # float64 so the naive loop and the batched path agree to ~1e-12


def naive(moe: MoEFFN, x: torch.Tensor, renorm: bool = False) -> torch.Tensor:
    """Loop over tokens: every expert's output, weighted by its softmax probability if among the top-k."""
    out = torch.zeros_like(x)
    bias = torch.zeros(moe.num_experts, dtype=x.dtype)
    if moe.bias_raw is not None:
        bias[1:] = -torch.log1p(torch.exp(moe.bias_raw.detach()))  # b = -softplus(raw), written out
    for t in range(x.shape[0]):
        logits = moe.router.weight @ x[t] + bias
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        chosen = sorted(range(moe.num_experts), key=lambda e: -p[e])[: moe.top_k]
        total = sum(p[e] for e in chosen)
        for e in chosen:
            w = p[e] / total if renorm else p[e]
            out[t] += w * moe.experts[e](x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("E,k", [(2, 1), (2, 2), (4, 2), (5, 3), (3, 3)])
def test_matches_naive_mixture_without_renormalisation(E, k):
    moe = make(E, k)
    x = torch.randn(11, moe.experts[0].gate_proj.in_features, dtype=torch.float64)
    with torch.no_grad():
        y, _ = moe(x)
        torch.testing.assert_close(y, naive(moe, x), rtol=1e-10, atol=1e-12)
        # the weights really are not renormalised: with k < E they sum to less than one
        w, _ = moe.routing(moe.router_logits(x))
        if k < E:
            assert (w.sum(-1) < 1 - 1e-4).all()


def test_norm_topk_prob_renormalises():
    moe = make(4, 2, norm_topk_prob=True)
    x = torch.randn(7, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], naive(moe, x, renorm=True), rtol=1e-10, atol=1e-12)


def test_top_k_picks_the_most_probable_experts():
    moe = make(5, 2)
    x = torch.randn(32, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = moe.router_logits(x)
        _, ids = moe.routing(logits)
    order = logits.argsort(-1, descending=True)[:, :2]
    assert torch.equal(ids, order)


def test_expert_bias_is_negative_starts_at_its_init_and_spares_the_public_expert():
    moe = make(3, 1, expert_bias=True, expert_bias_init=-0.75)
    torch.testing.assert_close(moe.expert_bias(), torch.full((2,), -0.75, dtype=torch.float64))
    x = torch.randn(16, 64, dtype=torch.float64)
    with torch.no_grad():
        moe.bias_raw.copy_(bias_to_raw(torch.tensor([-1e-30, -2.0], dtype=torch.float64)))
        biased = moe.router_logits(x)
        plain = moe.router(x)
    torch.testing.assert_close(biased[:, :2], plain[:, :2], rtol=0, atol=1e-11)  # b ~ 0: no change (within the floor)
    torch.testing.assert_close(biased[:, 2], plain[:, 2] - 2.0)
    with torch.no_grad():
        moe.bias_raw.copy_(torch.tensor([40.0, -40.0], dtype=torch.float64))
    b = moe.expert_bias().detach()
    assert (b < 0).all() and abs(b[0] + 40) < 1e-12 and -1e-17 < b[1] < 0  # every raw value gives b < 0
    for v in (b, torch.tensor([-0.3, -1e-9], dtype=torch.float64)):  # the round trip, above the 1e-12 floor
        v = v.clamp(max=-BIAS_FLOOR)
        torch.testing.assert_close(raw_to_bias(bias_to_raw(v)), v, rtol=1e-9, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], naive(moe, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("raw", [0.0, 0.5, 3.0])
def test_bias_gradient_is_alive_where_the_old_clamp_was_dead(raw):
    """FlexOlmo's min(b, 0) has zero gradient for b >= 0, where a bias trained from 0 drifted; ours never has."""
    moe = make(2, 2, expert_bias=True)
    x = torch.randn(64, 64, dtype=torch.float64)
    with torch.no_grad():
        moe.bias_raw.fill_(raw)
    y, _ = moe(x)
    (y * torch.randn_like(y)).sum().backward()
    assert moe.bias_raw.grad.abs().item() > 1e-6
    # the old parametrisation at the same stored value: no gradient at all
    old = torch.tensor([raw], dtype=torch.float64, requires_grad=True)
    logits = moe.router(x).detach() + torch.cat([torch.zeros(1, dtype=torch.float64), old.clamp(max=0.0)])
    (logits.softmax(-1)[:, 1] * torch.randn(64, dtype=torch.float64)).sum().backward()
    assert raw > 0 or old.grad is not None
    if raw > 0:
        assert old.grad.abs().item() == 0


def test_held_rows_train_the_router_but_not_the_experts():
    moe = make(3, 3, expert_bias=True)
    x = torch.randn(10, 64, dtype=torch.float64)
    hold = torch.zeros(10, dtype=torch.bool)
    hold[6:] = True
    y, _ = moe(x, hold)
    with torch.no_grad():
        torch.testing.assert_close(y, moe(x)[0], rtol=0, atol=0)  # the forward is unchanged
    y[6:].sum().backward()  # only held rows in the loss
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in moe.experts[1].parameters())
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in moe.experts[2].parameters())
    assert moe.experts[0].gate_proj.weight.grad.abs().max() > 0  # the public expert is never held
    assert moe.router.experts.grad.abs().max() > 0 and moe.bias_raw.grad.abs().max() > 0
    moe.zero_grad()
    y, _ = moe(x, hold)
    y[:6].sum().backward()  # free rows train the experts
    assert moe.experts[1].gate_proj.weight.grad.abs().max() > 0


def test_routing_statistics_on_a_planted_router():
    """Rows that point at expert e's router row: their probability mass and top-k choice is e's."""
    moe = make(3, 1)
    with torch.no_grad():
        moe.router.public.copy_(torch.eye(64, dtype=torch.float64)[:1] * 20)
        moe.router.experts.copy_(torch.eye(64, dtype=torch.float64)[1:3] * 20)
    x = torch.zeros(8, 64, dtype=torch.float64)
    x[:2, 0] = 1  # 2 tokens to the public expert
    x[2:8, 2] = 1  # 6 tokens to expert 2
    _, aux = moe(x)
    torch.testing.assert_close(aux["expert_topk"], torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    p_hi = torch.exp(torch.tensor(20.0, dtype=torch.float64)) / (torch.exp(torch.tensor(20.0)) + 2)
    want = torch.tensor([2 * p_hi + 6 * (1 - p_hi) / 2, 8 * (1 - p_hi) / 2, 6 * p_hi + 2 * (1 - p_hi) / 2]) / 8
    torch.testing.assert_close(aux["expert_prob"], want.double())


def test_a_large_negative_bias_opts_an_expert_out_of_routing():
    moe = make(3, 2, expert_bias=True)
    with torch.no_grad():
        moe.bias_raw.copy_(bias_to_raw(torch.tensor([0.0, -1e4], dtype=torch.float64)))
        _, ids = moe.routing(moe.router_logits(torch.randn(20, 64, dtype=torch.float64)))
    assert not (ids == 2).any()


def test_aux_losses_match_their_formulas():
    moe = make(4, 2)
    x = torch.randn(50, 64, dtype=torch.float64)
    with torch.no_grad():
        _, aux = moe(x)
        logits = moe.router_logits(x)
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    probs = logits.softmax(-1)
    top = probs.topk(2, -1).indices
    frac = torch.stack([(top == e).any(-1).float().mean() for e in range(4)]) / 2
    torch.testing.assert_close(aux["router_z_loss"], z)
    torch.testing.assert_close(aux["lb_loss"], 4 * (frac * probs.mean(0)).sum())
    torch.testing.assert_close(aux["expert_load"].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_dense_model_is_the_one_expert_case():
    moe = make(1, 1)
    assert moe.router is None and moe.bias_raw is None
    x = torch.randn(5, 64, dtype=torch.float64)
    y, aux = moe(x)
    torch.testing.assert_close(y, moe.experts[0](x))
    assert aux == {}
