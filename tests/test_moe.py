"""FlexOlmo routing: softmax over all experts, top-k, no renormalisation, bias clamped to <= 0, aux losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexmore.model import MoEFFN, load_preset


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
    if moe.expert_bias is not None:
        bias[1:] = torch.minimum(moe.expert_bias.detach(), torch.tensor(0.0, dtype=x.dtype))
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


def test_expert_bias_is_clamped_to_nonpositive_and_spares_the_public_expert():
    moe = make(3, 1, expert_bias=True)
    x = torch.randn(16, 64, dtype=torch.float64)
    with torch.no_grad():
        base = moe.router_logits(x)
        moe.expert_bias.copy_(torch.tensor([5.0, -2.0], dtype=torch.float64))  # +5 is clamped to 0; -2 applies to expert 2
        biased = moe.router_logits(x)
    torch.testing.assert_close(biased[:, :2], base[:, :2])
    torch.testing.assert_close(biased[:, 2], base[:, 2] - 2.0)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], naive(moe, x), rtol=1e-10, atol=1e-12)


def test_a_large_negative_bias_opts_an_expert_out_of_routing():
    moe = make(3, 2, expert_bias=True)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, -1e4], dtype=torch.float64))
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
    assert moe.router is None and moe.expert_bias is None
    x = torch.randn(5, 64, dtype=torch.float64)
    y, aux = moe(x)
    torch.testing.assert_close(y, moe.experts[0](x))
    assert aux == {}
