"""cuda_graphs: the step's phases replayed as CUDA graphs give the same bits as the eager step.

On CPU: the rates read from device scalars and the gradients read through the buffers and address rows a graph
reads give the same bits as the eager path, through the optimizer's own encode and decode; bad settings are refused.
On a GPU: whole steps with and without graphs, with a schedule that changes lr every step, a look-ahead, dense 1-D
tensors, two simulated replicas, gradients that move and a loaded state dict; a training loop; overlapped exchanges.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flexdemo import DeMoConfig, FlexDeMo
from flexdemo.graphs import DeviceScalars

SHAPES = [(70, 33), (64, 64), (33,), (5, 130)]  # the 1-D one is sent densely
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels: the interpreter on CPU


def make(device, seed=0, **settings):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.1) for s in SHAPES]
    return params, FlexDeMo(params, lr=0.02, config=DeMoConfig(chunk=16, topk=5, **settings))


def fill_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


DIRECT = {"base_step": "direct"}
# DeMo's direct step, and the default (the coefficient sign), each with a look-ahead, weight decay, 2-bit values
GRAPHED = [DIRECT, {**DIRECT, "nesterov": 0.5, "weight_decay": 0.1}, {**DIRECT, "value_bits": 2},
           {}, {"nesterov": 0.5, "weight_decay": 0.1, "value_bits": 2},
           {"weight_decay": 0.1, "value_bits": 1, "index_coding": "elias_fano"},  # the torch packing captured too
           {"weight_decay": 0.1, "dense_step": "adam", "sent_keep": 0.5},  # the 1-D tensor by Adam; part kept
           {"weight_decay": 0.1, "momentum_dtype": "bf16"}]  # the matrices' residual stored in bf16


# the Triton interpreter (CPU) takes ~25 s a case: there, one case per kernel path (each base step's decode, the
# look-ahead and 2-bit codes in encode, the sign wire's packing); on a GPU all of them
INTERPRETED = [GRAPHED[1], GRAPHED[4], GRAPHED[5]]


@pytest.mark.parametrize("settings,kernels", [(s, k) for s in GRAPHED for k in ("torch", "triton")
                                              if k == "torch" or DEVICE == "cuda" or s in INTERPRETED])
def test_rates_as_device_scalars_give_the_same_bits(settings, kernels):
    """What a captured graph runs (encode and decode with rates read from device scalars, gradients new tensors
    every step read through their copies and address rows) equals the eager step."""
    runs = []
    for as_tensors in (False, True):
        params, opt = make(DEVICE, kernels=kernels, **settings)
        opt._scalars = DeviceScalars(torch.device(DEVICE))  # what cuda_graphs=true sets up
        for step in range(3):
            fill_grads(params, step)
            opt.param_groups[0]["lr"] = 0.02 / (step + 1)
            lr = opt.param_groups[0]["lr"]
            rates = [(lr * (1 + opt.cfg.nesterov), -opt.cfg.nesterov * lr)]
            steps = opt._decode_steps([(lr, opt.param_groups[0]["weight_decay"])])
            feed = None
            if as_tensors:  # and the gradients read through the buffers and address rows a graph reads
                rates, steps = opt._device_rates("e", rates), opt._device_rates("d", steps)
                assert all(isinstance(x, torch.Tensor) for x in rates[0] + steps[0])
                _, feed = opt._feed(0)
                assert all(feed.grads[id(p)] is not p.grad for p in params if p.dim() == 1)  # the dense: copies
            with torch.no_grad():
                payload = opt._encode(0, rates, feed)
                opt._decode_apply(torch.stack([payload, payload]), 0, steps)
        runs.append(([p.detach().clone() for p in params], [opt.state[p]["delta"].clone() for p in params], payload))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][2], runs[1][2])


def test_device_scalars_are_rewritten_in_place():
    """A graph reads the scalars' memory: each call writes the new values to the same storage."""
    scalars = DeviceScalars(torch.device("cpu"))
    a = scalars("x", [1.5, -2.0])
    b = scalars("x", [0.25, 3.0])
    assert a[0].data_ptr() == b[0].data_ptr() and a[1].data_ptr() == b[1].data_ptr()
    assert a[0].item() == 0.25 and a[1].item() == 3.0


@pytest.mark.parametrize("settings,message", [
    ({"cuda_graphs": "yes"}, "cuda_graphs='yes' must be true or false"),
    ({"cuda_graphs": True, "base_step": "adam"}, "captures base_step=direct or coefficient_sign only; got "
                                                 "base_step='adam'"),
    ({"cuda_graphs": True, "tensor_scale": "adam_rms"}, "tensor_scale='adam_rms'"),
])
def test_bad_graph_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        DeMoConfig(**settings)


def test_graphs_need_triton_on_cuda():
    with pytest.raises(ValueError, match="cuda_graphs=true captures the Triton kernels on a CUDA device; here "
                                         "kernels=torch on cpu"):
        make("cpu", kernels="torch", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("settings", GRAPHED)
def test_graphed_steps_equal_eager_steps(settings):
    """Ten steps, lr changing every step, two simulated replicas: gradients stay in place for steps 0-5 (captured at
    the second, replayed after), are new tensors at 6 and 7 (eager), and return to the first ones at 8-9, where a
    loaded state dict has also replaced the momenta: parameters, momenta and payloads equal the eager optimizer's bit
    for bit."""
    runs = []
    for graphs in (False, True):
        params, opt = make("cuda", cuda_graphs=graphs, **settings)
        grads = [torch.zeros_like(p) for p in params]
        payloads = []
        for step in range(10):
            fill_grads(params, step)
            if step not in (6, 7):  # 6, 7: fresh tensors at new addresses
                for g, p in zip(grads, params):
                    g.copy_(p.grad)
                    p.grad = g
            opt.param_groups[0]["lr"] = 0.02 * (1 + step % 3) / 3
            if step == 8:  # a resume: new momentum tensors, which a graph captured before must not write to
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            payload = opt.encode()
            opt.decode_apply(torch.stack([payload, payload]))
            payloads.append(payload.clone())
        torch.cuda.synchronize()
        runs.append((params, opt, payloads))
    (p0, o0, x0), (p1, o1, x1) = runs
    assert o1._graphs.captures >= 2 and o1._graphs.replays >= 8  # encode and decode captured, then replayed
    for a, b in zip(x0, x1):
        assert torch.equal(a, b)
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)
        assert torch.equal(o0.state[a]["delta"], o1.state[b]["delta"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_are_replayed_in_a_training_loop():
    """forward, backward, clip, step, zero_grad(set_to_none=True): the gradients come back where they were, so the
    phases are replayed in (at least) the last five steps of eight (else the option would only add eager runs)."""
    import dataclasses

    from flexmore.model import build_model, load_preset

    cfg = load_preset("tiny")
    cfg = dataclasses.replace(cfg, vocab_size=cfg.resolved_vocab(259))
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda")
    opt = FlexDeMo(model.parameters(), lr=1e-3, config=DeMoConfig(cuda_graphs=True))
    x = torch.randint(0, 256, (4, 65), device="cuda")
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert opt._graphs.captures >= 2 and opt._graphs.replays >= 2 * 5
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("overlap", ["stale", "layerwise"])
def test_graphs_with_the_exchange_overlapped(overlap):
    """overlap=stale (each update applied a step late) and layerwise (one exchange per layer, each update applied
    just before that layer's next forward, from a hook): a model trained with graphs equals the same model trained
    eagerly, bit for bit, and the phases are replayed."""
    import dataclasses

    from flexmore.config import OptimConfig
    from flexmore.model import build_model, load_preset
    from flexmore.train.optim import build_optimizer

    cfg = load_preset("tiny")
    cfg = dataclasses.replace(cfg, vocab_size=cfg.resolved_vocab(259))
    x = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(1)).cuda()
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, device="cuda")
        opt = build_optimizer(model, OptimConfig(name="flexdemo", lr=1e-3, demo=DeMoConfig(
            overlap=overlap, cuda_graphs=graphs)), torch.device("cuda"))
        for step in range(6):
            opt.param_groups[0]["lr"] = 1e-3 / (step + 1)
            loss = model(x[:, :-1], x[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt.flush()
        runs.append((model, opt))
    (m0, _), (m1, o1) = runs
    assert o1._graphs.replays > 0
    for a, b in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(a, b)


def test_a_failed_capture_says_what_to_do(monkeypatch):
    """A capture that fails (an operation a graph cannot hold) stops with the phase and the way out, and has taken
    no step: capturing only records."""
    from flexdemo.graphs import PhaseGraphs

    graphs, ran = PhaseGraphs(), []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)

    def refuse(*a, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    assert graphs.run(("encode", 0), lambda: ran.append(1) or "out") == "out"  # first time: eager
    with pytest.raises(RuntimeError, match=r"capturing the optimizer's encode phase as a CUDA graph failed \("
                                           r"operation not permitted.*this step was not taken. Resume with "
                                           r"optim.demo.cuda_graphs=false"):
        graphs.run(("encode", 0), lambda: ran.append(1) or "out")
    assert ran == [1] and graphs.captures == 0
