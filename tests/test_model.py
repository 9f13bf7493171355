"""The decoder: shapes, the OLMo2 pieces against naive formulas, meta-device builds, and the param count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexmore.model import ModelConfig, build_model, count_params, flops_per_token, load_preset
from flexmore.model.layers import RMSNorm, apply_rope, rope_tables


def cfg_with(**kw) -> ModelConfig:
    return dataclasses.replace(load_preset("tiny"), vocab_size=96, **kw)


def test_forward_backward_shapes_and_every_param_gets_a_gradient():
    model = build_model(cfg_with(num_experts=3, top_k=2, expert_bias=True, router_z_loss_weight=1e-3,
                                 lb_loss_weight=1e-2))
    x = torch.randint(0, 96, (3, 17))
    out = model(x, x)
    assert out.logits.shape == (3, 17, 96)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.aux) >= {"router_z_loss", "lb_loss"}
    assert out.loss.item() > out.ce_loss.item()  # the router losses are added
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    x = torch.randn(4, 8, dtype=torch.float64)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()).double(), ref, rtol=1e-5, atol=1e-6)


def test_rope_is_a_rotation_that_preserves_relative_position():
    cos, sin = rope_tables(8, 16, theta=10_000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    qs, ks = q.expand(1, 1, 16, 8), k.expand(1, 1, 16, 8)
    qr, kr = apply_rope(qs, cos, sin), apply_rope(ks, cos, sin)
    torch.testing.assert_close(qr.norm(dim=-1), qs.norm(dim=-1))  # rotations keep the norm
    # <q at m, k at n> depends only on m - n
    torch.testing.assert_close((qr[0, 0, 5] * kr[0, 0, 2]).sum(), (qr[0, 0, 9] * kr[0, 0, 6]).sum())


def test_block_is_reordered_norm_olmo2():
    """Zeroing the post-attention and post-FFN norm weights turns every block into the identity."""
    model = build_model(cfg_with())
    with torch.no_grad():
        for b in model.blocks:
            b.post_attention_norm.weight.zero_()
            b.post_ffn_norm.weight.zero_()
    x = torch.randint(0, 96, (2, 9))
    ref = model.lm_head(model.norm(model.embed(x)))
    torch.testing.assert_close(model(x).logits, ref)


def test_causal():
    model = build_model(cfg_with())
    x = torch.randint(0, 96, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 96
    torch.testing.assert_close(model(x).logits[:, :8], model(y).logits[:, :8])


def test_matches_transformers_flexolmo():
    """Independent reference: transformers' FlexOlmoForCausalLM with our weights gives our logits."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlexOlmoForCausalLM"):
        pytest.skip("this transformers has no FlexOlmo")
    cfg = cfg_with(num_experts=3, top_k=2, d_ffn=48)
    ours = build_model(cfg).eval()
    hf_cfg = transformers.FlexOlmoConfig(
        vocab_size=96, hidden_size=cfg.d_model, intermediate_size=cfg.d_ffn, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, num_experts=3, num_experts_per_tok=2,
        norm_topk_prob=False, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    hf = transformers.FlexOlmoForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.lm_head.weight}
    for i, b in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            sd[p + f"self_attn.{n}.weight"] = getattr(b.attn, n).weight
        sd[p + "post_attention_layernorm.weight"] = b.post_attention_norm.weight
        sd[p + "post_feedforward_layernorm.weight"] = b.post_ffn_norm.weight
        sd[p + "mlp.gate.weight"] = b.ffn.router.weight
        ex = b.ffn.experts
        sd[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in ex])
        sd[p + "mlp.experts.down_proj"] = torch.stack([e.down_proj.weight for e in ex])
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    x = torch.randint(0, 96, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-4, atol=1e-5)


def test_7b_shape_builds_on_meta_without_memory():
    cfg = load_preset("flexolmo_7x7b")
    model = build_model(cfg, device="meta")
    counts = count_params(model)
    assert all(p.is_meta for p in model.parameters())
    # FlexOlmo-7x7B: ~33.3B parameters in all, ~20B active with 4 of 7 experts
    assert 33.0e9 < counts.total < 33.6e9, counts.total
    assert 19.5e9 < counts.active < 20.5e9, counts.active


def test_param_counts_and_flops():
    cfg = cfg_with(num_experts=4, top_k=2)
    model = build_model(cfg)
    counts = count_params(model)
    expert = 3 * cfg.d_model * cfg.d_ffn
    assert counts.total - counts.active == 2 * expert * cfg.n_layers  # two of four experts idle per token
    for p in model.blocks[0].ffn.experts[1].parameters():
        p.requires_grad_(False)
    assert count_params(model).trainable == counts.total - expert
    assert flops_per_token(model, 10) == 6 * (counts.active - 96 * cfg.d_model) + 12 * cfg.n_layers * cfg.d_model * 10


def test_build_on_meta_then_materialise_is_deterministic():
    a, b = build_model(cfg_with(), seed=3), build_model(cfg_with(), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    torch.testing.assert_close(a.rope_cos, rope_tables(a.cfg.head_dim, a.cfg.max_seq_len, a.cfg.rope_theta)[0])


@pytest.mark.parametrize(
    "kw, match",
    [({"num_experts": 2, "top_k": 3}, "top_k=3 is larger than num_experts=2"),
     ({"d_model": 60, "n_heads": 8}, "not divisible"),
     ({"n_kv_heads": 3}, "must divide n_heads"),
     ({"n_layers": 0}, "n_layers=0")],
)
def test_bad_shapes_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg_with(**kw)


def test_sequence_longer_than_max_fails():
    model = build_model(cfg_with(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("experts, context", [(2, "token"), (3, "prefix"), (3, "sequence")])
def test_left_padded_rows_give_their_unpadded_logits(experts, context):
    """The attention mask hides pad keys and RoPE is relative: a left-padded row equals the same tokens alone (with
    prefix or sequence routing, the pads are left out of the sequence's running sums too)."""
    model = build_model(cfg_with(num_experts=experts, top_k=2, route_context=context)).eval()
    a, b = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (1, 5))
    x = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    with torch.no_grad():
        both = model(x, attention_mask=valid).logits
        torch.testing.assert_close(both[0], model(a).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[1, 4:], model(b).logits[0], rtol=1e-5, atol=1e-5)


def test_ranks_are_one_value_validated_where_they_enter():
    from flexmore.model.experts import Ranks

    assert Ranks.of(8) == Ranks.of([8]) == Ranks.of("8") == Ranks(8, 8, 8)
    assert Ranks.of("4,16,8").as_list() == [4, 16, 8] == Ranks.of([4, 16, 8]).as_list()
    for bad, msg in ((0, r"ranks=\[0\]: need whole ranks >= 1"), ([1, 2], r"ranks=\[1, 2\]: one rank, or three"),
                     ("a,b", "ranks 'a,b': one rank, or three"), ([2.5], r"need whole ranks"), ([True], "whole")):
        with pytest.raises(ValueError, match=msg):
            Ranks.of(bad)
    with pytest.raises(ValueError, match=r"expert_ranks\[1\]: ranks=\[4, 0, 4\]"):
        cfg_with(num_experts=2, top_k=2, expert_kinds=["full", "lowrank"], expert_ranks=[[], [4, 0, 4]])
