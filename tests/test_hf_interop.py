"""FlexOlmo interop: a tiny random FlexOlmo built by transformers in the test (no download) is imported, split,
re-merged and exported; logits are compared with transformers' own at every step."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlexOlmoForCausalLM"):
    pytest.skip("this transformers has no FlexOlmo", allow_module_level=True)

from flexmore.experts.hf import export_hf, import_hf, split_hf  # noqa: E402
from flexmore.experts.merge import merge  # noqa: E402
from flexmore.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.FlexOlmoConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
        eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    model = transformers.FlexOlmoForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and routers
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            if "mlp.gate" in n:
                p.mul_(20)
    path = tmp_path_factory.mktemp("hf") / "flexolmo"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_import_gives_transformers_logits(hf_dir):
    path, ref = hf_dir
    ours = import_hf(path).eval()
    assert ours.cfg.num_experts == 3 and ours.cfg.top_k == 2 and ours.cfg.kv_heads == 2
    x = torch.randint(0, 96, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf_logits(ref, x), rtol=1e-5, atol=1e-5)


def test_import_of_the_per_expert_key_layout(hf_dir, tmp_path):
    path, ref = hf_dir
    st = {}
    for f in path.glob("*.safetensors"):
        st.update(load_file(f))
    split = {}
    for k, v in st.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                gate, up = v[e].chunk(2)
                split[f"{pre}{e}.gate_proj.weight"], split[f"{pre}{e}.up_proj.weight"] = gate, up
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                split[f"{pre}{e}.down_proj.weight"] = v[e]
        else:
            split[k] = v
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in split.items()}, tmp_path / "old" / "model.safetensors")
    (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
    x = torch.randint(0, 96, (1, 23))
    with torch.no_grad():
        torch.testing.assert_close(import_hf(tmp_path / "old")(x).logits, hf_logits(ref, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_export_then_transformers_load_gives_the_same_logits(hf_dir, tmp_path, layout):
    path, _ = hf_dir
    ours = import_hf(path).eval()
    out = export_hf(ours, tmp_path / "exported", layout=layout)
    if layout == "per_expert":  # what transformers 4.57 reads; read back by our importer
        reloaded = import_hf(out)
        x = torch.randint(0, 96, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x).logits, ours(x).logits)
        return
    theirs = transformers.FlexOlmoForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(theirs, x), ours(x).logits, rtol=1e-5, atol=1e-5)


def test_split_into_base_and_artifacts_then_merge_back(hf_dir, tmp_path):
    path, ref = hf_dir
    base, arts = split_hf(path, tmp_path / "split", names=["code", "math"])
    assert [a.name for a in arts] == ["code", "math"]
    assert json.loads((arts[0] / "manifest.json").read_text())["kind"] == "full"
    merged = merge(base, arts, top_k=2).eval()
    x = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, hf_logits(ref, x), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_model_with_a_learned_expert_bias(hf_dir, tmp_path):
    ours = import_hf(hf_dir[0])
    base, arts = split_hf(hf_dir[0], tmp_path / "s")
    merged = merge(base, arts)
    with torch.no_grad():
        merged.blocks[0].ffn.bias_raw.fill_(0.5)
    with pytest.raises(ValueError, match="learned expert bias .* bias='drop'"):
        export_hf(merged, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # bias='drop' writes the model without its bias: transformers' logits = ours with the bias switched off
    export_hf(merged, tmp_path / "dropped", bias="drop")
    hf = transformers.FlexOlmoForCausalLM.from_pretrained(tmp_path / "dropped").eval()
    no_bias = dataclasses.replace(merged.cfg, expert_bias=False)
    plain = build_model(no_bias)
    plain.load_state_dict({k: v for k, v in merged.state_dict().items() if "bias_raw" not in k})
    x = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, x), plain(x).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(x).logits, merged(x).logits, atol=1e-4)  # the bias mattered
    with pytest.raises(ValueError, match="bias='keep'; allowed: error, drop"):
        export_hf(merged, tmp_path / "y", bias="keep")
    with pytest.raises(ValueError, match="model_type"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        import_hf(tmp_path / "bad")
    assert ours.cfg.num_experts == 3
