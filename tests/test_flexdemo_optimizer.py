"""FlexDeMo against an independent naive DeMo (dense DCT matrices, explicit loops), with simulated replicas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import naive_orthogonal

from flexdemo import DeMoConfig, FlexDeMo
from flexdemo.orthogonal import UPDATE_RMS


def naive_dct(n: int) -> torch.Tensor:
    d = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        for i in range(n):
            d[k, i] = math.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt((1 if k == 0 else 2) / n)
    return d


class NaiveDeMo:
    """One replica's state in float64; ``step`` takes every replica's gradients and returns the new params."""

    def __init__(self, params, lr, beta, k, s, wd, sign, adam=None, lion=None, nesterov=0.0, scale=None, replicas=1,
                 orthogonal=False, mean_all=False, dense_adam=None, keep=0.0):
        self.keep = keep  # the share of each sent coefficient that the momentum keeps (2-D tensors)
        self.dense_adam = dense_adam  # (beta1, beta2, eps): 1-D tensors sent lr-free, stepped by Adam on the mean
        self.mean_all = mean_all  # average each position over all replicas, not over those that sent it
        self.senders_seen = set()  # how many replicas sent a position, over every position decoded
        self.orthogonal = orthogonal  # each matrix's unsigned direction orthogonalised (Newton-Schulz), 1-D signed
        self.params = [p.detach().double().clone() for p in params]
        # scale = (beta1, beta2, eps): each tensor's step x the replicas' mean RMS of m / (sqrt(v) + eps), m and v
        # each replica's moments of its own gradient (``gm``, ``gv``; ``observe`` updates them)
        self.scale = scale
        self.gm = [[torch.zeros_like(p) for p in self.params] for _ in range(replicas)]
        self.gv = [[torch.zeros_like(p) for p in self.params] for _ in range(replicas)]
        self.nesterov = nesterov  # send from delta + nesterov * lr * grad; keep delta minus what was sent
        self.lr, self.beta, self.k, self.s, self.wd, self.sign = lr, beta, k, s, wd, sign
        self.D = naive_dct(s)
        self.adam = adam  # (beta1, beta2, eps): the decoded direction is an Adam step's gradient
        self.lion = lion  # (beta1, beta2): ... or a Lion step's
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @staticmethod
    def new_deltas(params):
        return [torch.zeros_like(p, dtype=torch.float64) for p in params]

    def encode_one(self, delta, grad, fold=None):
        """Returns {chunk (ci, cj) or 'dense': {position: value}} and updates delta in place; ``fold`` multiplies
        grad as it enters delta (default lr)."""
        fold = self.lr if fold is None else fold
        nesterov = self.nesterov
        if delta.ndim == 1 and self.dense_adam is not None:
            fold, nesterov = 1.0, 0.0
        delta.mul_(self.beta).add_(grad.double(), alpha=fold)
        ahead = delta + nesterov * fold * grad.double()
        if delta.ndim == 1:
            msg = {"dense": {i: ahead[i].item() for i in range(delta.numel())}}
            delta.sub_(ahead)
            return msg
        s, msg = self.s, {}
        rows, cols = delta.shape
        for ci in range(0, rows, s):
            for cj in range(0, cols, s):
                block = torch.zeros(s, s, dtype=torch.float64)
                r, c = min(s, rows - ci), min(s, cols - cj)
                block[:r, :c] = ahead[ci : ci + r, cj : cj + c]
                C = (self.D @ block @ self.D.T).flatten()
                chosen = sorted(range(s * s), key=lambda j: -abs(C[j].item()))[: self.k]
                msg[(ci, cj)] = {j: C[j].item() for j in chosen}
                sent = torch.zeros(s * s, dtype=torch.float64)
                for j in chosen:
                    sent[j] = C[j]
                delta[ci : ci + r, cj : cj + c] -= (1 - self.keep) * (self.D.T @ sent.view(s, s) @ self.D)[:r, :c]
        return msg

    def observe(self, replica, grads):
        """tensor_scale: one replica's gradients into its own moments."""
        b1, b2, _ = self.scale
        for i, g in enumerate(grads):
            self.gm[replica][i] = b1 * self.gm[replica][i] + (1 - b1) * g.double()
            self.gv[replica][i] = b2 * self.gv[replica][i] + (1 - b2) * g.double() ** 2

    def local_update(self, replica, i):
        """The Adam update of one replica's own moments (no bias correction)."""
        return self.gm[replica][i] / (self.gv[replica][i].sqrt() + self.scale[2])

    def tensor_scale(self, i):
        rms = [float(self.local_update(r, i).pow(2).mean().sqrt()) for r in range(len(self.gm))]
        return sum(rms) / len(rms)

    def apply(self, msgs_per_param):
        """msgs_per_param[i] = list over replicas of that param's message."""
        for i, (p, msgs) in enumerate(zip(self.params, msgs_per_param)):
            p.mul_(1 - self.lr * self.wd)
            update = torch.zeros_like(p)
            chunks = {}  # the decoded chunks, padding included
            keys = msgs[0].keys()
            for key in keys:
                total, count = {}, {}
                for m in msgs:
                    for pos, v in m[key].items():
                        total[pos] = total.get(pos, 0.0) + v
                        count[pos] = count.get(pos, 0) + 1
                if key == "dense":
                    for pos in total:
                        update[pos] = total[pos] / count[pos]
                    continue
                C = torch.zeros(self.s * self.s, dtype=torch.float64)
                for pos in total:
                    C[pos] = total[pos] / (len(msgs) if self.mean_all else count[pos])
                    self.senders_seen.add(count[pos])
                if self.orthogonal == "coefficient_sign":  # the signs, at the per-chunk orthogonal step's scale
                    C = C.sign() * UPDATE_RMS * self.s ** 0.5
                block = self.D.T @ C.view(self.s, self.s) @ self.D
                ci, cj = key
                chunks[key] = block
                r, c = min(self.s, p.shape[0] - ci), min(self.s, p.shape[1] - cj)
                update[ci : ci + r, cj : cj + c] = block[:r, :c]
            if update.ndim == 1 and self.dense_adam is not None:
                b1, b2, eps = self.dense_adam
                self.m[i] = b1 * self.m[i] + (1 - b1) * update
                self.v[i] = b2 * self.v[i] + (1 - b2) * update * update
                p.sub_(self.lr * self.m[i] / (self.v[i].sqrt() + eps))
                continue
            d = update.sign() if self.sign else update
            if self.orthogonal == "chunk" and update.ndim == 2:  # each whole decoded s x s chunk on its own
                for (ci, cj), block in chunks.items():
                    r, c = min(self.s, p.shape[0] - ci), min(self.s, p.shape[1] - cj)
                    p[ci : ci + r, cj : cj + c] -= self.lr * naive_orthogonal(block)[:r, :c]
                continue
            if self.orthogonal:  # the 2-D tensors' own step (unsigned), the 1-D ones' as configured
                if update.ndim == 2:
                    d = naive_orthogonal(update) if self.orthogonal is True else update
                p.sub_(self.lr * d)
                continue
            if self.lion is not None:
                b1, b2 = self.lion
                p.sub_(self.lr * (b1 * self.m[i] + (1 - b1) * d).sign())
                self.m[i] = b2 * self.m[i] + (1 - b2) * d
                continue
            if self.adam is None:
                p.sub_(self.lr * d * self.tensor_scale(i))
                continue
            b1, b2, eps = self.adam
            self.m[i] = b1 * self.m[i] + (1 - b1) * d
            self.v[i] = b2 * self.v[i] + (1 - b2) * d * d
            p.sub_(self.lr * self.m[i] / (self.v[i].sqrt() + eps))


@pytest.mark.parametrize("sign, base_step, nesterov, scale, precondition", [
    (True, "direct", 0.0, "none", "none"), (False, "direct", 0.0, "none", "none"), (True, "adam", 0.0, "none", "none"),
    (False, "adam", 0.0, "none", "none"), (False, "lion", 0.0, "none", "none"), (True, "direct", 0.9, "none", "none"),
    (False, "direct", 0.9, "none", "none"), (True, "direct", 0.0, "adam_rms", "none"),
    (False, "direct", 0.0, "adam_rms", "none"), (False, "direct", 0.0, "none", "adam"),
    (True, "direct", 0.0, "none", "adam"), (True, "direct", 0.9, "adam_rms", "adam"),
    (True, "direct", 0.0, "none", "nofold"), (True, "direct", 0.9, "none", "nofold"),
    (True, "orthogonal", 0.0, "none", "none"), (False, "orthogonal", 0.9, "none", "nofold"),
    (True, "orthogonal-chunk", 0.0, "none", "none"), (True, "direct", 0.0, "none", "meanall"),
    (False, "direct", 0.9, "none", "meanall"), (True, "orthogonal-chunk", 0.0, "none", "meanall"),
    (True, "coefficient_sign", 0.0, "none", "none"), (False, "coefficient_sign", 0.9, "none", "nofold"),
    (True, "coefficient_sign", 0.0, "none", "denseadam"), (True, "direct", 0.9, "none", "denseadam"),
    (True, "coefficient_sign", 0.0, "none", "keep"), (True, "direct", 0.9, "none", "keep")])
def test_matches_naive_demo_with_two_simulated_replicas(sign, base_step, nesterov, scale, precondition):
    """precondition "nofold" here: precondition=none with fold_lr=False (the momentum gathers bare gradients);
    "meanall": precondition=none with replica_mean=all (each position averaged over both replicas); "denseadam":
    precondition=none with dense_step=adam (the 1-D tensor by Adam on the replicas' mean gradient); "keep":
    precondition=none with sent_keep=0.4 (the momenta keep 0.4 of the coefficients they sent)."""
    fold_lr = precondition != "nofold"
    mean_all = precondition == "meanall"
    dense_adam = precondition == "denseadam"
    keep = 0.4 if precondition == "keep" else 0.0
    precondition = "none" if not fold_lr or mean_all or dense_adam or keep else precondition
    torch.manual_seed(0)
    # ragged edges of 2 rows and 2 columns (an edge of 1 row makes coefficients (0, j) and (2, j) tie exactly in
    # the DCT, and fp32 and float64 pick differently among ties)
    shapes = [(14, 10), (8, 8), (7,)]
    init = [torch.randn(s) for s in shapes]
    R, steps, lr, beta, k, s, wd = 2, 4, 0.05, 0.9, 3, 4, 0.1
    # every replica holds the same parameters and its own momentum
    reps = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(R)]
    # a first Adam update is +-(1 - b1) / sqrt(1 - b2) everywhere, whose DCT coefficients tie: a large eps keeps
    # the top-k away from ties that fp32 and float64 would break differently
    eps = 0.5 if precondition != "none" else 1e-3
    opts = [FlexDeMo(ps, lr=lr, beta=beta, topk=k, chunk=s, weight_decay=wd, sign=sign, value_dtype="fp32",
                     value_bits=0, base_step=base_step.split("-")[0],
                     orthogonal_scope="chunk" if "chunk" in base_step else "matrix", adam_betas=(0.8, 0.9),
                     adam_eps=eps, nesterov=nesterov, tensor_scale=scale, precondition=precondition, fold_lr=fold_lr,
                     replica_mean="all" if mean_all else "senders", dense_step="adam" if dense_adam else "sign",
                     sent_keep=keep)
            for ps in reps]
    local = scale != "none" or precondition != "none"  # the replicas' own gradient moments
    assert [p.layout is not None for p in opts[0].plans] == [True, True, False]
    naive = NaiveDeMo(init, lr, beta, k, s, wd, sign, adam=(0.8, 0.9, 1e-3) if base_step == "adam" else None,
                      lion=(0.8, 0.9) if base_step == "lion" else None, nesterov=nesterov,
                      scale=(0.8, 0.9, eps) if local else None, replicas=R,
                      orthogonal={"orthogonal": True, "orthogonal-chunk": "chunk",
                                  "coefficient_sign": "coefficient_sign"}.get(base_step, False),
                      mean_all=mean_all, dense_adam=(0.8, 0.9, eps) if dense_adam else None, keep=keep)
    if scale == "none":
        naive.tensor_scale = lambda i: 1.0
    naive_deltas = [NaiveDeMo.new_deltas(init) for _ in range(R)]
    for step in range(steps):
        grads = [[torch.randn(sh) for sh in shapes] for _ in range(R)]
        for ps, gs in zip(reps, grads):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
        gathered = torch.stack([o.encode() for o in opts])  # what the all-gather would deliver
        for o in opts:
            o.decode_apply(gathered)
        if local:
            for r in range(R):
                naive.observe(r, grads[r])
        if precondition == "adam":  # each replica folds its own Adam update, lr-free
            msgs = [[naive.encode_one(naive_deltas[r][i], naive.local_update(r, i), fold=1.0) for r in range(R)]
                    for i in range(len(shapes))]
        else:
            fold = None if fold_lr else 1.0
            msgs = [[naive.encode_one(naive_deltas[r][i], grads[r][i], fold=fold) for r in range(R)]
                    for i in range(len(shapes))]
        naive.apply(msgs)
        for r in range(R):
            for p, q in zip(reps[r], naive.params):
                torch.testing.assert_close(p.detach().double(), q, atol=1e-5, rtol=1e-5)
            for i in range(len(shapes)):
                torch.testing.assert_close(opts[r].state[reps[r][i]]["delta"].double(), naive_deltas[r][i],
                                           atol=1e-5, rtol=1e-5)
    assert naive.senders_seen == {1, 2}  # positions one replica sent and positions both sent: the means differ
    # replicas agree bit for bit; their residual momenta differ
    for p, q in zip(reps[0], reps[1]):
        assert torch.equal(p, q)
    assert not torch.equal(opts[0].state[reps[0][0]]["delta"], opts[1].state[reps[1][0]]["delta"])


def two_replicas(init: list[torch.Tensor], steps: int = 4, between=None, **settings) -> tuple:
    """Two simulated replicas from the same weights, each step fresh seeded gradients: (each replica's parameters,
    its optimizer, the last gathered payloads). ``between(opt, params)``: after the exchange, before the decode."""
    reps = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(2)]
    opts = [FlexDeMo(ps, lr=0.01, weight_decay=0.1, **settings) for ps in reps]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for ps in reps:
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
        gathered = torch.stack([o.encode() for o in opts])
        for o, ps in zip(opts, reps):
            if between is not None:
                between(o, ps)
            o.decode_apply(gathered)
    return reps, opts, gathered


@pytest.mark.parametrize("base_step, value_bits", [("coefficient_sign", 0), ("coefficient_sign", 2), ("direct", 0)])
def test_elias_fano_indices_take_the_same_steps_as_fixed_ones_in_fewer_bytes(base_step, value_bits):
    """Each chunk's positions go sorted, with their values: the replicas' mean of every position is the same sum, so
    two simulated replicas end bit-identical to the same run with 12-bit indices."""
    torch.manual_seed(0)
    shapes = [(70, 66), (64, 64), (7,)]  # ragged edge chunks, a full chunk, a dense 1-D tensor
    init = [torch.randn(s) for s in shapes]
    runs = {}
    for coding in ("fixed", "elias_fano"):
        reps, _, gathered = two_replicas(init, base_step=base_step, value_bits=value_bits, index_coding=coding)
        runs[coding] = (reps, gathered.shape[1])
    (fixed, fixed_bytes), (coded, coded_bytes) = runs["fixed"], runs["elias_fano"]
    for r in range(2):
        for p, q in zip(fixed[r], coded[r]):
            assert torch.equal(p, q)
    chunks = 2 * 2 + 1  # 70 x 66 in four chunks (three of them ragged), 64 x 64 in one
    assert fixed_bytes - coded_bytes >= chunks * (48 - 36) - 8  # the payload rounds up to 8 bytes


def test_a_bf16_momentum_steps_as_an_fp32_one_rounded_after_each_step():
    """momentum_dtype=bf16 with two simulated replicas: the same as the fp32 momentum with each compressed tensor's
    residual rounded to nearest bf16 after every encode (the 1-D tensor's kept in fp32), bit for bit."""
    torch.manual_seed(0)
    shapes = [(70, 66), (64, 64), (7,)]
    init = [torch.randn(s) for s in shapes]
    def rounded(opt, params):  # what the encode left, as a bf16 state stores it
        for p in params[:2]:
            opt.state[p]["delta"].copy_(opt.state[p]["delta"].bfloat16())

    ref, ref_opts, _ = two_replicas(init, between=rounded, value_bits=2)
    half, half_opts, _ = two_replicas(init, value_bits=2, momentum_dtype="bf16")
    for r in range(2):
        for i, (p, q) in enumerate(zip(ref[r], half[r])):
            assert torch.equal(p, q)
            m, h = ref_opts[r].state[p]["delta"], half_opts[r].state[q]["delta"]
            assert h.dtype == (torch.bfloat16 if i < 2 else torch.float32) and torch.equal(m, h.float())
    # a state dict loaded the way torch loads it (each tensor cast to its parameter's dtype) keeps the residuals'
    fresh = FlexDeMo(half[0], lr=0.01, weight_decay=0.1, value_bits=2, momentum_dtype="bf16")
    fresh.load_state_dict(half_opts[0].state_dict())
    for p in half[0]:
        assert torch.equal(fresh.state[p]["delta"], half_opts[0].state[p]["delta"])
        assert fresh.state[p]["delta"].dtype == half_opts[0].state[p]["delta"].dtype


def test_momentum_dtype_is_checked():
    with pytest.raises(ValueError, match="momentum_dtype='fp16'; allowed: fp32, bf16"):
        DeMoConfig(momentum_dtype="fp16")
    with pytest.raises(ValueError, match="momentum_dtype='bf16' .* nesterov=0.5 .*use momentum_dtype=fp32 or "
                                         "nesterov=0"):
        DeMoConfig(momentum_dtype="bf16", nesterov=0.5)


def test_sign_values_are_the_unquantised_step_at_one_replica_and_a_scale_weighted_vote_at_two():
    """value_bits=1: the momentum loses what the unquantised wire's does; the replicas receive each value's sign at
    its chunk's largest |value|. One replica: the coefficient sign's step is the unquantised one, bit for bit. Two:
    the mean of the +-scales, decoded by the reference from the unquantised payload."""
    from flexdemo.chunks import ChunkLayout
    from flexdemo.ops.decode_reference import decode_apply_reference
    from flexdemo.orthogonal import UPDATE_RMS

    torch.manual_seed(0)
    shapes = [(70, 66), (7,)]
    init = [torch.randn(s) for s in shapes]
    lr, wd, k = 0.01, 0.1, 32
    for replicas in (1, 2):
        runs = {}
        for bits in (0, 1):
            reps = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(replicas)]
            opts = [FlexDeMo(ps, lr=lr, weight_decay=wd, value_bits=bits) for ps in reps]
            gen = torch.Generator().manual_seed(1)
            for _ in range(3):
                for ps in reps:
                    for p in ps:
                        p.grad = torch.randn(p.shape, generator=gen)
                before = [p.detach().clone() for p in reps[0]]
                gathered = torch.stack([o.encode() for o in opts])
                for o in opts:
                    o.decode_apply(gathered)
            runs[bits] = (reps, opts, before, gathered)
        (plain, popts, _, pgathered), (signs, sopts, before, _) = runs[0], runs[1]
        for r in range(replicas):  # the momenta lose the same values
            for p, q in zip(plain[r], signs[r]):
                assert torch.equal(popts[r].state[p]["delta"], sopts[r].state[q]["delta"])
        if replicas == 1:
            assert all(torch.equal(p, q) for p, q in zip(plain[0], signs[0]))
            continue
        # the last step, from the same parameters: each replica's values of the unquantised payload as +-scale
        idx, vals = popts[0].buckets[0].wire.unpack(pgathered)
        n = idx.shape[1]
        v = vals[:, :n].float().view(replicas, -1, k)
        scale = v.abs().amax(dim=2, keepdim=True)
        pm = torch.where(v >= 0, scale, -scale).view(replicas, n)
        want = before[0].clone()
        decode_apply_reference(want, idx, pm, ChunkLayout(70, 66, 64), k, lr * UPDATE_RMS * 8, 1 - lr * wd,
                               False, coefficient_sign=True)
        assert torch.equal(signs[0][0].detach(), want) and not torch.equal(signs[0][0], plain[0][0])
        assert torch.equal(signs[0][0], signs[1][0])


def test_single_worker_has_no_exchange_and_reports_no_replicate_traffic():
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = FlexDeMo([p], lr=0.01, base_step="direct")
    p.grad = torch.randn(64, 64)
    before = p.detach().clone()
    opt.step()
    assert opt.last_comm["replicate_sent_bytes"] == 0
    moved = (p.detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.01))  # sign update: every element moves by lr
    assert opt.last_comm["compression"] >= 64


def _delayed_reference_run(rank: int, group, steps: int, flush: bool, link=None):
    """A naive one-step-delayed FlexDeMo, driven by hand from the plain optimizer's phases, next to the overlapped
    optimizer; both see the same gradients. Returns (overlapped params, reference params)."""
    torch.manual_seed(0)
    shapes = [(13, 10), (8, 8), (7,)]
    init = [torch.randn(s) for s in shapes]
    kw = dict(lr=0.05, beta=0.9, topk=3, chunk=4, weight_decay=0.1)
    ps_o, ps_r = [torch.nn.Parameter(t.clone()) for t in init], [torch.nn.Parameter(t.clone()) for t in init]
    opt_o = FlexDeMo(ps_o, replicate_group=group, overlap="stale", link=link, **kw)
    opt_r = FlexDeMo(ps_r, replicate_group=group, **kw)
    gen = torch.Generator().manual_seed(100 + rank)  # each replica its own gradients
    previous = rates = None
    for step in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for o in (opt_o, opt_r):
            for g in o.param_groups:
                g["lr"] = 0.05 * (1 + step) / steps  # a schedule: a delayed update uses the lr of the step that sent it
        for p, q, g in zip(ps_o, ps_r, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_o.step()
        payload = opt_r.encode()
        if previous is not None:
            opt_r.decode_apply(previous, rates=rates)
        previous, rates = opt_r.exchange(payload), [(g["lr"], g["weight_decay"]) for g in opt_r.param_groups]
        if step == 0:
            assert all(torch.equal(p, t) for p, t in zip(ps_o, init))  # the first step applies nothing
    if flush:
        opt_o.flush()
        opt_r.decode_apply(previous, rates=rates)
    return [p.detach().clone() for p in ps_o], [p.detach().clone() for p in ps_r]


@pytest.mark.parametrize("flush", [False, True])
def test_overlap_applies_each_update_one_step_late(flush):
    over, ref = _delayed_reference_run(0, None, 5, flush)
    for p, q in zip(over, ref):
        assert torch.equal(p, q)


def job_overlap_two_replicas() -> list:
    import torch.distributed as dist

    from flexdemo.link import LinkCap

    dist.init_process_group("gloo")
    link = LinkCap(gbps=1.0, latency_ms=20.0)  # overlapped: the link's time is waited out when the update is used
    over, ref = _delayed_reference_run(dist.get_rank(), dist.group.WORLD, 5, flush=True, link=link)
    return [over, ref, link.collectives, link.seconds]


def test_overlap_over_two_gloo_replicas_is_bit_identical_and_equals_the_delayed_reference():
    from distributed import run_distributed_test

    results = run_distributed_test(job_overlap_two_replicas, 2)
    (over0, ref0, collectives, seconds), (over1, *_) = results
    for a, b, c in zip(over0, over1, ref0):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert collectives == 5 and seconds >= 5 * 0.020  # every exchange went through the capped link, in full


def test_overlap_with_a_strategy_without_exchange_is_refused():
    from flexmore.config import OptimConfig

    for mode in ("stale", "layerwise"):
        with pytest.raises(ValueError, match=rf"optim.demo.overlap={mode} overlaps FlexDeMo's exchange, but "
                                             r"optim.name='adamw'"):
            OptimConfig(name="adamw", demo=DeMoConfig(overlap=mode))
        assert OptimConfig(name="flexdemo", demo=DeMoConfig(overlap=mode)).demo_config().overlap == mode
    with pytest.raises(ValueError, match=r"overlap=True; allowed: off, stale, layerwise"):
        DeMoConfig(overlap=True)


def test_buckets_must_partition_the_optimised_tensors():
    a, b, c = (torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3))
    with pytest.raises(ValueError, match=r"in buckets 0 and 1"):
        FlexDeMo([a, b], chunk=4, topk=2, buckets=[[a], [a, b]])
    with pytest.raises(ValueError, match=r"1 optimised tensors are in no bucket"):
        FlexDeMo([a, b], chunk=4, topk=2, buckets=[[a]])
    with pytest.raises(ValueError, match=r"bucket 1 holds a tensor of shape \(8, 8\) that is not in the optimizer"):
        FlexDeMo([a, b], chunk=4, topk=2, buckets=[[a, b], [c]])
    opt = FlexDeMo([a, b], chunk=4, topk=2, buckets=[[b], [a]], overlap="layerwise")
    with pytest.raises(ValueError, match=r"1 modules for 2 buckets"):
        opt.attach([torch.nn.Linear(2, 2)])
    assert opt.payload_nbytes == sum(bk.wire.nbytes for bk in opt.buckets) and len(opt.buckets) == 2


def test_uncompressed_unsigned_precondition_is_adam_with_decoupled_weight_decay():
    """Everything sent in fp32 (k = all: the plan sends it densely), no residual left (beta 0), one replica:
    precondition=adam is Adam (no bias correction) with AdamW's decoupled weight decay, against a plain float64 Adam
    over 6 steps. (The compressed path is checked against the naive DeMo above.)"""
    torch.manual_seed(0)
    shapes = [(16, 12), (10,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().double().clone() for p in ps]
    m, v = [torch.zeros_like(r) for r in ref], [torch.zeros_like(r) for r in ref]
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.9, 0.95), 1e-8
    opt = FlexDeMo(ps, lr=lr, base_step="direct", chunk=4, topk=16, beta=0.0, sign=False, value_dtype="fp32",
                   value_bits=0, weight_decay=wd, precondition="adam", adam_betas=(b1, b2), adam_eps=eps)
    assert [p.layout for p in opt.plans] == [None, None]
    for _ in range(6):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g.double()
            v[i] = b2 * v[i] + (1 - b2) * g.double() ** 2
            ref[i] = ref[i] * (1 - lr * wd) - lr * m[i] / (v[i].sqrt() + eps)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach().double(), r, atol=2e-6, rtol=1e-6)


def test_fold_lr_is_checked():
    with pytest.raises(ValueError, match="fold_lr='no' must be true or false"):
        DeMoConfig(fold_lr="no")


def test_replica_mean_is_checked():
    with pytest.raises(ValueError, match="replica_mean='sum'; allowed: senders, all"):
        DeMoConfig(replica_mean="sum")


def test_dense_step_is_checked():
    with pytest.raises(ValueError, match="dense_step='lion'; allowed: sign, adam"):
        DeMoConfig(dense_step="lion")
    with pytest.raises(ValueError, match="dense_step='adam' steps the dense-sent tensors of base_step=direct or "
                                         "coefficient_sign .* got base_step='lion'"):
        DeMoConfig(dense_step="adam", base_step="lion")
    with pytest.raises(ValueError, match="got base_step='direct', precondition='adam'"):
        DeMoConfig(dense_step="adam", base_step="direct", precondition="adam")
    with pytest.raises(ValueError, match="dense_step='adam' .* tensor_scale='adam_rms' .use dense_step=sign."):
        DeMoConfig(dense_step="adam", base_step="direct", tensor_scale="adam_rms")


@pytest.mark.parametrize("keep", [-0.1, 1.0, float("nan")])
def test_sent_keep_is_checked(keep):
    with pytest.raises(ValueError, match=rf"sent_keep={keep} must be in \[0, 1\)"):
        DeMoConfig(sent_keep=keep)


def test_precondition_is_checked():
    with pytest.raises(ValueError, match="precondition='sgd'; allowed: none, adam"):
        DeMoConfig(precondition="sgd")
    for step in ("lion", "coefficient_sign"):
        with pytest.raises(ValueError, match="precondition='adam' folds Adam's steps into the momentum, to be applied "
                                             f"by the direct step; got base_step='{step}' \\(add base_step=direct\\)"):
            DeMoConfig(precondition="adam", base_step=step)
    assert DeMoConfig(precondition="adam", base_step="direct").precondition == "adam"


def test_tensor_scale_is_checked_and_sent_as_one_float_per_tensor():
    from flexdemo import DeMoConfig

    with pytest.raises(ValueError, match="tensor_scale='adam_rms' scales the direct step; got base_step='adam'"):
        DeMoConfig(tensor_scale="adam_rms", base_step="adam")
    with pytest.raises(ValueError, match="got base_step='coefficient_sign' \\(add base_step=direct\\)"):
        DeMoConfig(tensor_scale="adam_rms")  # the default step has its own scale
    ps = [torch.nn.Parameter(torch.randn(70, 66)), torch.nn.Parameter(torch.randn(9))]
    plain, scaled = FlexDeMo(ps, lr=0.01, base_step="direct"), FlexDeMo(ps, lr=0.01, base_step="direct",
                                                                     tensor_scale="adam_rms")
    assert scaled.payload_nbytes == plain.payload_nbytes + 4 * len(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in ps]
    scaled.step()
    # after one gradient m = (1 - b1) g and v = (1 - b2) g^2, so every element moves by lr * (1 - b1) / sqrt(1 - b2)
    b1, b2 = scaled.cfg.adam_betas
    for p, b in zip(ps, before):
        torch.testing.assert_close((p.detach() - b).abs(), torch.full_like(b, 0.01 * (1 - b1) / (1 - b2) ** 0.5),
                                   rtol=1e-4, atol=1e-7)


def job_orthogonal_shards() -> list:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flexdemo.orthogonal import orthogonal_step, orthogonalize_all

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    full = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))  # 9 rows: shards of 5 and 4
    param = distribute_tensor(torch.zeros(9, 6), mesh, [Shard(0)])
    direction = distribute_tensor(full, mesh, [Shard(0)]).to_local()
    orthogonalize_all([param], [direction])
    return [direction, distribute_tensor(orthogonal_step(full), mesh, [Shard(0)]).to_local()]


def test_orthogonal_step_of_a_sharded_matrix_is_its_shard_of_the_whole_matrix_step():
    """base_step=orthogonal under FSDP: the whole matrix is orthogonalised (gathered over the shard group), so a shard's
    step is the same as with the matrix on one GPU; and the step itself is near U V^T at AdamW's update RMS."""
    from distributed import run_distributed_test

    from flexdemo.orthogonal import UPDATE_RMS, orthogonal_step

    for got, want in run_distributed_test(job_orthogonal_shards, 2):
        assert got.shape == want.shape and got.shape[0] in (5, 4)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    d = torch.randn(40, 24, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 24, dtype=torch.float64))
    u, _, vt = torch.linalg.svd(d, full_matrices=False)
    step = orthogonal_step(d).double() / (UPDATE_RMS * 40 ** 0.5)
    sv = torch.linalg.svdvals(step)
    assert 0.6 < sv.min() and sv.max() < 1.25  # every direction moved alike, the small ones included
    cos = float((step * (u @ vt)).sum() / (step.norm() * (u @ vt).norm()))
    assert cos > 0.97


def test_equal_shaped_matrices_are_orthogonalised_in_one_batch_each_on_its_own(monkeypatch):
    """orthogonalize_all stacks the matrices of one shape, and the chunk twin every tensor's chunks, in batches of at
    most BATCH_ELEMENTS, and gives each matrix or chunk the step it gets alone; bf16 products (Muon's precision) stay
    within bf16's rounding of the fp32 step and keep every singular value near 1."""
    from flexdemo.ops import newton_schulz_reference as orthogonal  # where the batches' limit lives
    from flexdemo.orthogonal import UPDATE_RMS, orthogonal_step, orthogonalize_all

    g = torch.Generator().manual_seed(0)
    shapes = [(24, 40), (7, 3, 5), (24, 40), (40, 24), (24, 40), (7, 15)]  # (7, 3, 5) and (7, 15): one (7, 15) batch
    directions = [torch.randn(s, generator=g) for s in shapes]
    params = [torch.zeros(s) for s in shapes]
    alone = [orthogonal_step(d.reshape(d.shape[0], -1)).view_as(d) for d in directions]
    whole = orthogonal.BATCH_ELEMENTS  # the default: room for everything at once
    for limit in (whole, 2 * 24 * 40):  # everything of one shape at once; then batches of two
        monkeypatch.setattr(orthogonal, "BATCH_ELEMENTS", limit)
        got = [d.clone() for d in directions]
        orthogonalize_all(params, got)
        for x, want in zip(got, alone):
            torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-6)
    from flexdemo.chunks import ChunkLayout
    from flexdemo.ops.decode_orthogonal_reference import decode_orthogonal_apply_reference

    lay, k = ChunkLayout(24, 40, 4), 3  # scope chunk: the twin's chunks in batches too
    idx = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(lay.num_chunks)]).view(1, -1)
    vals = torch.randn(1, idx.numel(), generator=g)
    got = []
    for limit in (whole, 5 * 16):  # every chunk at once; then five chunks a batch
        monkeypatch.setattr(orthogonal, "BATCH_ELEMENTS", limit)
        got.append(torch.zeros(24, 40))
        decode_orthogonal_apply_reference(got[-1], idx, vals, lay, k, 1.0, 1.0)
    assert got[0].abs().max() > 0
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-6)
    low = [d.clone() for d in directions]
    orthogonalize_all(params, low, precision="bf16")
    for x, want in zip(low, alone):
        assert x.dtype == torch.float32
        assert 0 < float((x - want).norm() / want.norm()) < 0.05  # rounded as bf16 rounds, no more
        scale = UPDATE_RMS * max(x.shape[0], x[0].numel()) ** 0.5
        sv = torch.linalg.svdvals(x.reshape(x.shape[0], -1).double()) / scale
        assert 0.5 < sv.min() and sv.max() < 1.3
