"""The training loop: loss goes down, resume is bit-identical, checkpoints are atomic, bad input fails early."""

from __future__ import annotations

import pytest
import torch
from conftest import replace_section, tiny_config

from flexmore.store import checkpoint as ckpt_mod
from flexmore.store.checkpoint import CheckpointManager
from flexmore.train.loop import train


def test_loss_goes_down_on_embedded_data(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"steps": 40, "eval_every": 40})
    res = train(cfg)
    assert "comm per step" not in capsys.readouterr().out  # one process, AdamW: nothing to exchange
    first = sum(res.losses[s] for s in range(1, 6)) / 5
    last = sum(res.losses[s] for s in range(36, 41)) / 5
    assert last < 0.75 * first, (first, last)
    assert set(res.val[40]) == {"public", "math"}


def test_resume_is_bit_identical(tmp_path):
    """Straight 12 steps == stop at 5, then resume to 12: the same losses and weights, bit for bit."""
    full = train(tiny_config(tmp_path / "a", model={"num_experts": 2, "top_k": 2, "expert_bias": True},
                             train={"grad_accum": 2, "eval_every": 4}))
    cfg_b = tiny_config(tmp_path / "b", model={"num_experts": 2, "top_k": 2, "expert_bias": True},
                        train={"grad_accum": 2, "eval_every": 4, "stop_at": 5})
    part = train(cfg_b)
    assert part.checkpoint.name == "step_00000005"
    torch.manual_seed(1234)  # a different global RNG state must not matter
    rest = train(replace_section(cfg_b, "train", stop_at=None))
    assert rest.resumed_from == 5
    for s in range(6, 13):
        assert rest.losses[s] == full.losses[s], (s, rest.losses[s], full.losses[s])
    # the resumed result covers the whole run: the steps before the cut come back from the checkpoint
    assert rest.losses == full.losses and set(full.val) <= set(rest.val) and rest.val[4] == full.val[4]
    for (n, p), (_, q) in zip(full.model.named_parameters(), rest.model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("rule, key", [({"base_step": "adam"}, "exp_avg"),
                                       ({"base_step": "direct", "tensor_scale": "adam_rms"}, "grad_avg"),
                                       ({"base_step": "direct", "precondition": "adam", "sign": False}, "grad_avg_sq"),
                                       ({"base_step": "coefficient_sign", "dense_step": "adam"}, "exp_avg_sq"),
                                       ({"momentum_dtype": "bf16"}, "delta")])
def test_resume_with_flexdemos_moments_is_bit_identical(tmp_path, capsys, rule, key):
    """The moments of base_step=adam, of tensor_scale or of precondition are checkpointed with the residuals: stop
    at 5, resume, same as straight."""
    optim = {"name": "flexdemo", "lr": 1e-3, "chunk": 16, "topk": 8, "weight_decay": 0.0, **rule}
    full = train(tiny_config(tmp_path / "a", optim=optim))
    out = capsys.readouterr().out  # what a step sends, at start-up and measured at the end
    payload = f"{full.comm['comm/payload_bytes'] / 1e6:,.3f} MB"
    assert f"comm per step and rank: across nodes 0.000 MB (one replica: a payload of {payload}" in out
    assert "comm per step and rank (measured, last step): across nodes" in out
    cfg_b = tiny_config(tmp_path / "b", optim=optim, train={"stop_at": 5})
    train(cfg_b)
    rest = train(replace_section(cfg_b, "train", stop_at=None))
    assert rest.resumed_from == 5 and all(rest.losses[s] == full.losses[s] for s in range(6, 13))
    for (n, p), (_, q) in zip(full.model.named_parameters(), rest.model.named_parameters()):
        assert torch.equal(p, q), n
    m = [s[key] for s in rest.optimizer.state.values() if key in s]  # dense_step: the 1-D tensors' only
    assert m and all(x.abs().sum() > 0 for x in m)
    if rule.get("momentum_dtype") == "bf16":  # restored as stored: the matrices' in bf16, the 1-D tensors' in fp32
        assert {x.dtype for x in m} == {torch.bfloat16, torch.float32}


def test_keep_last_k_and_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"steps": 6, "save_every": 2, "keep_last": 2})
    train(cfg)
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert mgr.steps() == [4, 6]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt_mod.dcp, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        train(replace_section(cfg, "train", steps=8))
    assert mgr.latest().name == "step_00000006"  # the half-written step 8 is not taken as latest
    assert mgr.steps() == [4, 6]
    monkeypatch.undo()
    res = train(replace_section(cfg, "train", steps=8))
    assert res.resumed_from == 6 and mgr.steps() == [6, 8]
    assert not [p for p in mgr.dir.iterdir() if p.name.endswith(".tmp")]


def test_resume_with_another_model_shape_fails_before_any_work(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"steps": 2})
    train(cfg)
    built = []
    monkeypatch.setattr("flexmore.train.loop.build_streams", lambda *a: built.append(1))
    bigger = replace_section(cfg, "model", d_ffn=256, n_layers=3)
    with pytest.raises(ValueError, match=r"another model shape \(d_ffn: checkpoint 192 vs config 256, n_layers"):
        train(bigger)
    assert built == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
@pytest.mark.parametrize("demo,message", [
    ({"cuda_graphs": True}, "cuda_graphs=true captures the Triton kernels on a CUDA device; here kernels=torch on cpu"),
    ({"kernels": "triton", "chunk": 48}, "kernels=triton cannot run: chunk=48 is not one of"),
])
def test_flexdemo_settings_the_device_cannot_run_fail_before_any_work(tmp_path, monkeypatch, demo, message):
    built = []
    monkeypatch.setattr("flexmore.train.loop.build_streams", lambda *a: built.append(1))
    cfg = tiny_config(tmp_path, optim={"name": "flexdemo", **demo})
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert built == []


def test_seq_len_larger_than_model_max_is_rejected_at_config(tmp_path):
    with pytest.raises(ValueError, match="train.seq_len=512 is larger than the model's max_seq_len=256"):
        tiny_config(tmp_path, train={"seq_len": 512})


def test_token_ids_outside_the_model_vocab_fail_before_training(tmp_path):
    from flexmore.data import write_documents

    shards = write_documents(tmp_path / "wide", [[1, 2, 3, 400] * 50], vocab_size=1000, eos_id=257, tokenizer="byte")
    cfg = tiny_config(tmp_path, data={"source": "shards", "paths": [str(shards)], "val_domains": []})
    with pytest.raises(ValueError, match="holds token id 400, outside the model's vocabulary of 320"):
        train(cfg)


def test_shards_from_another_tokenizer_are_rejected(tmp_path):
    from flexmore.data import write_documents

    shards = write_documents(tmp_path / "other", [[1, 2, 3] * 50], vocab_size=259, eos_id=257, tokenizer="hf-abc")
    cfg = tiny_config(tmp_path, data={"source": "shards", "paths": [str(shards)], "val_domains": []})
    with pytest.raises(ValueError, match="tokenised with 'hf-abc'"):
        train(cfg)


def test_missing_and_empty_data_paths(tmp_path):
    with pytest.raises(ValueError, match="needs data.paths"):
        tiny_config(tmp_path, data={"source": "shards", "paths": []})
    cfg = tiny_config(tmp_path, data={"source": "shards", "paths": [str(tmp_path / "nowhere")]})
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        train(cfg)


def test_edge_lr_scale_moves_the_embedding_lm_head_and_1d_tensors_by_that_multiple():
    """optim.edge_lr_scale=0.3 with FlexDeMo's sign update: the embedding, lm_head and norms step 0.3 x lr per
    element, every other matrix lr; at 1 the groups are the usual two."""
    import dataclasses

    from flexdemo import FlexDeMo
    from flexmore.model import build_model, load_preset
    from flexmore.train.optim import LRSchedule, param_groups

    model = build_model(dataclasses.replace(load_preset("tiny"), vocab_size=320), seed=0)
    assert len(param_groups(model, 0.1)) == 2
    groups = param_groups(model, 0.0, edge_lr_scale=0.3)
    names = {id(p): n for n, p in model.named_parameters()}
    edge = {names[id(p)] for g in groups if g.get("lr_scale") == 0.3 for p in g["params"]}
    assert {"embed.weight", "lm_head.weight", "norm.weight"} <= edge and not any(".attn.q_proj" in n for n in edge)
    # k = s*s: every coefficient sent, as bf16 values
    opt = FlexDeMo(groups, lr=1.0, chunk=16, topk=256, kernels="torch", value_bits=0, index_coding="fixed")
    LRSchedule.apply(opt, 0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for n, p in model.named_parameters():
        moved = (p.detach() - before[n]).abs()
        want = 0.003 if n in edge else 0.01
        assert torch.allclose(moved[moved > 0], torch.tensor(want), rtol=1e-3), n


def test_layerwise_overlap_under_compile_trains_as_no_overlap(tmp_path):
    """The layers' pre-forward hooks under train.compile: with a graph compiled before in the same process for a
    model of the same shape (which had no hooks), the hooks must still run (the loop resets dynamo's cache)."""
    losses = {}
    for mode in ("off", "layerwise"):
        cfg = tiny_config(tmp_path / mode, optim={"name": "flexdemo", "lr": 3e-3, "chunk": 16, "topk": 8,
                                                  "overlap": mode}, train={"steps": 4, "compile": True})
        losses[mode] = train(cfg).losses
    assert losses["layerwise"] == pytest.approx(losses["off"], rel=1e-5)  # compiled graphs split at the hooks
    assert losses["off"][2] != pytest.approx(losses["off"][1], rel=1e-3)  # the steps moved the weights
