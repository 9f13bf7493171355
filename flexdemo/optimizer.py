"""FlexDeMo: DeMo over a replicate process group, on whatever local shard each rank holds.

Inside a node FSDP2 reduce-scatters gradients, so each GPU's ``.grad`` is its shard of the node's averaged gradient.
Across nodes, the GPUs owning the same shard form the replicate group; this optimizer runs DeMo among them:

    delta = beta * delta + lr * grad                    (local, per replica: error feedback)
    send the top-k DCT coefficients of each chunk of delta, and remove them from delta
    one all-gather of every replica's packed payload    (one collective per step; or one per layer, overlap=layerwise)
    p = p * (1 - lr * wd) - lr * sign(IDCT(mean over replicas of the coefficients))
    (base_step=adam / lion: that direction is instead the gradient of an Adam / Lion step; base_step=orthogonal: each
    matrix's unsigned direction orthogonalised as Muon does (flexdemo.orthogonal), or per chunk; base_step=
    coefficient_sign: the mean coefficients' signs decoded, the per-chunk orthogonal step's limit;
    tensor_scale=adam_rms: each tensor's step times the replicas' mean RMS of the Adam update of their own gradients,
    sent with the payload; precondition=adam: each replica folds its own Adam update m / (sqrt(v) + eps) into delta
    instead of lr * grad)

Encode and decode + apply run as Triton kernels on CUDA (``kernels``), one launch per param group and dtype for all
compressed tensors, with torch twins for the CPU.

Every replica decodes the same gathered bytes in the same order with the same arithmetic, so replicas stay
bit-identical. With no replicate group (or one of size 1) this is single-worker DeMo; with the whole world as the
replicate group and unsharded parameters it is DeMo as in the paper (``DeMo``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from flexdemo import ops
from flexdemo.chunks import ChunkLayout
from flexdemo.config import DECODE_STEPS, MOMENTUM_DTYPES, DeMoConfig
from flexdemo.graphs import DeviceScalars, PhaseGraphs
from flexdemo.link import LinkCap
from flexdemo.ops.chunk_table import ChunkTable
from flexdemo.ops.options import KernelOptions
from flexdemo.orthogonal import UPDATE_RMS, orthogonalize_all
from flexdemo.quant import codes_nbytes
from flexdemo.wire import WireLayout, index_nbytes

# torch >= 2.13 names it all_gather_single and deprecates all_gather_into_tensor; both fill a flat output.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's own piece of a DTensor (FSDP2 shard), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_grad(p: torch.Tensor) -> torch.Tensor | None:
    return local_tensor(p.grad) if p.grad is not None else None


@dataclass
class ParamPlan:
    """Where one parameter's payload sits in the packed buffer; identical on every replica."""

    layout: ChunkLayout | None  # None: sent densely
    first_chunk: int  # its place in the sparse payload, in chunks of k entries
    dense_offset: int  # its place in the values, in entries
    num_dense: int


@dataclass
class _Exchange:
    """An all-gather in flight: ``wait()`` finishes it (and, on a capped link, the time the link would take)."""

    gathered: torch.Tensor  # (replicas, nbytes), where the collective writes
    work: object  # the async collective's handle, or None (finished)
    device: torch.device  # where the payload lives
    hold: tuple | None  # (LinkCap, bytes, messages, started)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.hold is not None:
            link, *rest = self.hold
            if self.gathered.is_cuda:
                torch.cuda.synchronize(self.gathered.device)
            link.hold(*rest)
            self.hold = None
        return self.gathered.to(self.device)


def _add_scaled(xs: list[torch.Tensor], ys: list[torch.Tensor | None], scale) -> None:
    """xs += ys * scale where ys is not None (as fp32); ``scale`` a float or a device scalar (the same bits)."""
    pairs = [(x, y.float()) for x, y in zip(xs, ys) if y is not None]
    if pairs:
        torch._foreach_add_([x for x, _ in pairs], torch._foreach_mul([y for _, y in pairs], scale))


def _allocated_once(store: dict, key, like: torch.Tensor) -> torch.Tensor:
    """``store[key]``, allocated like ``like`` the first time: a graph captured on it reads it on every replay, so it
    is never reallocated under the same key."""
    box = store.get(key)
    if box is None:
        box = store[key] = torch.empty_like(like)
    return box


def _descend(params: list, steps: list[torch.Tensor], lr: float, decay: float) -> None:
    """p = p * decay - lr * step, in fp32, stored in p's dtype (the base steps' common last move)."""
    locals_ = [local_tensor(p) for p in params]
    updated = torch._foreach_mul([x.float() for x in locals_], decay)
    torch._foreach_add_(updated, steps, alpha=-lr)
    torch._foreach_copy_(locals_, updated)


@dataclass
class _Feed:
    """cuda_graphs: what a captured encode reads in place of the live gradients (``FlexDeMo._feed``)."""

    grads: dict  # id(param) -> the gradient to read (its own buffer, or the live one read through address rows)
    addresses: dict  # id(ChunkTable) -> the device table of this step's address rows


@dataclass
class _GroupPlan:
    tables: list  # (ChunkTable, params) per parameter dtype
    dense: list  # params sent densely
    dense_slice: slice  # their values in the buffer


@dataclass
class _Bucket:
    """Parameters exchanged in one all-gather: their payload layout (a wire of their own) and, per param group,
    their launch plan. One bucket holds everything unless the exchange is split by layer (overlap="layerwise")."""

    plans: dict  # id(param) -> ParamPlan, offsets within this bucket's wire
    wire: WireLayout
    groups: list  # a _GroupPlan per param group (possibly empty)
    members: list  # its parameters in optimizer order (tensor_scale: one scale each, after the wire's bytes)


@dataclass
class _Pending:
    """A bucket's exchange in flight, with the learning rates of the step that sent it (its update uses them)."""

    bucket: int
    exchange: "_Exchange"
    rates: list  # (lr, weight decay) per param group


def _as_2d(g: torch.Tensor | None, lay: ChunkLayout) -> torch.Tensor | None:
    return g.reshape(lay.rows, lay.cols) if g is not None else None


def _replica_mean(rows: torch.Tensor) -> torch.Tensor:
    """The mean of (replicas, n) rows, summed in replica order 0..R-1: the same bits on every replica."""
    mean = rows[0].clone()
    for r in range(1, rows.shape[0]):
        mean += rows[r]
    return mean / rows.shape[0]


def _views_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat tensor into views shaped like ``like``, in order."""
    return [v.view_as(x) for v, x in zip(flat.split([x.numel() for x in like]), like)]


def check_runnable(cfg: DeMoConfig, device: torch.device) -> str:
    """The kernels ``cfg`` resolves to on ``device``, or a ValueError naming the setting that cannot run there: a
    trainer calls it before it builds data or weights."""
    kernels = ops.resolve_kernels(cfg.kernels, device, cfg.chunk)
    if cfg.cuda_graphs and (kernels != "triton" or device.type != "cuda"):
        raise ValueError(f"cuda_graphs=true captures the Triton kernels on a CUDA device; here kernels={kernels} on "
                         f"{device.type} (set cuda_graphs=false)")
    return kernels


def plan_params(shapes: list[torch.Size], cfg: DeMoConfig) -> tuple[list[ParamPlan], WireLayout]:
    """Compress a tensor when its packed top-k payload is smaller than sending it densely, else send it dense."""
    val_bytes = torch.empty(0, dtype=cfg.wire_dtype).element_size()
    bits = cfg.resolved_index_bits
    plans: list[ParamPlan] = []
    chunks = dense = 0
    for shape in shapes:
        numel = int(torch.Size(shape).numel())
        layout = None
        if len(shape) >= 2 and numel > 0:
            cand = ChunkLayout(int(shape[0]), numel // int(shape[0]), cfg.chunk)
            n = cand.num_chunks * cfg.topk
            sent = (codes_nbytes(n, cfg.value_bits) + 2 * cand.num_chunks) if cfg.value_bits else n * val_bytes
            if sent + index_nbytes(n, bits, cfg.topk, cfg.elias_fano_positions) < numel * val_bytes:
                layout = cand
        if layout is not None:
            plans.append(ParamPlan(layout, chunks, 0, 0))
            chunks += layout.num_chunks
        else:
            plans.append(ParamPlan(None, 0, dense, numel))
            dense += numel
    sparse = chunks * cfg.topk
    for p in plans:  # dense values follow all sparse values in the buffer
        if p.layout is None:
            p.dense_offset += sparse
    return plans, WireLayout(sparse, dense, cfg.wire_dtype, bits, cfg.value_bits, cfg.topk, cfg.elias_fano_positions)


class FlexDeMo(torch.optim.Optimizer):
    """DeMo on local shards, exchanged over ``replicate_group`` (None: no exchange, single worker)."""

    def __init__(self, params: Iterable, replicate_group: dist.ProcessGroup | None = None, lr: float = 1e-3,
                 config: DeMoConfig | None = None, kernel_options: KernelOptions | None = None,
                 link: LinkCap | None = None, buckets: list[list[torch.Tensor]] | None = None, **overrides):
        cfg = config or DeMoConfig()
        if overrides:
            cfg = DeMoConfig(**{**cfg.__dict__, **overrides})
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0")
        super().__init__(params, {"lr": lr, "weight_decay": cfg.weight_decay})
        self.cfg = cfg
        self.group = replicate_group
        self.link = link  # a capped (emulated slow) link for the exchange
        self.replicas = dist.get_world_size(replicate_group) if replicate_group is not None else 1
        self.params = [p for g in self.param_groups for p in g["params"]]
        for p in self.params:
            if cfg.base_step in ("adam", "lion"):  # identical on every replica: they see the same decoded direction
                self.state[p]["exp_avg"] = torch.zeros_like(local_tensor(p), dtype=torch.float32)
            if cfg.base_step == "adam":
                self.state[p]["exp_avg_sq"] = torch.zeros_like(local_tensor(p), dtype=torch.float32)
            if cfg.tensor_scale != "none" or cfg.precondition != "none":  # this replica's own moments
                for key in ("grad_avg", "grad_avg_sq"):
                    self.state[p][key] = torch.zeros_like(local_tensor(p), dtype=torch.float32)
        device = local_tensor(self.params[0]).device
        self.kernels = check_runnable(cfg, device)
        self._graphs: PhaseGraphs | None = None
        if cfg.cuda_graphs:
            self._graphs, self._scalars = PhaseGraphs(), DeviceScalars(device)
        self.kernel_options = kernel_options or cfg.kernel_options()  # explicit ones: a benchmark's settings
        self.buckets = [self._make_bucket(ps, device) for ps in self._check_buckets(buckets)]
        plans = {k: pl for b in self.buckets for k, pl in b.plans.items()}
        self.plans = [plans[id(p)] for p in self.params]
        for p, plan in zip(self.params, self.plans):  # made once the plans say which tensors are compressed
            self.state[p]["delta"] = torch.zeros_like(local_tensor(p), dtype=self._state_dtype("delta", plan))
        if cfg.dense_step == "adam":  # the dense-sent tensors' moments, alike on every replica
            for p, plan in zip(self.params, self.plans):
                if plan.layout is None:
                    for key in ("exp_avg", "exp_avg_sq"):
                        self.state[p][key] = torch.zeros_like(local_tensor(p), dtype=torch.float32)
        self.last_comm: dict[str, float] = {}
        self._pending: list[_Pending] = []  # overlap: exchanges whose updates are not applied yet
        self._inboxes: dict = {}  # cuda_graphs: where a captured decode reads the gathered payloads
        self._boxes: dict = {}  # cuda_graphs: where a captured encode reads gradients and their address rows

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts each state tensor to its parameter's dtype: cast back to the state's own."""
        super().load_state_dict(state_dict)
        self._cast_states()

    def _state_dtype(self, key: str, plan) -> torch.dtype:
        """momentum_dtype for the compressed tensors' residuals, fp32 for the dense-sent tensors' residuals and for
        every moment."""
        return MOMENTUM_DTYPES[self.cfg.momentum_dtype] if key == "delta" and plan.layout is not None else torch.float32

    def _cast_states(self) -> None:
        """Every state tensor in its dtype (``_state_dtype``)."""
        for p, plan in zip(self.params, self.plans):
            for key, v in self.state[p].items():
                if torch.is_tensor(v) and v.is_floating_point():
                    self.state[p][key] = v.to(self._state_dtype(key, plan))

    @property
    def wire(self) -> WireLayout:
        """The payload layout (one bucket; with several, each bucket has its own: ``buckets[i].wire``)."""
        if len(self.buckets) != 1:
            raise AttributeError(f"{len(self.buckets)} buckets: each has its own wire (buckets[i].wire)")
        return self.buckets[0].wire

    @property
    def payload_nbytes(self) -> int:
        return sum(b.wire.nbytes + self._scale_nbytes(b) for b in self.buckets)

    def _scale_nbytes(self, b: _Bucket) -> int:
        """tensor_scale: one fp32 per tensor after the wire's bytes."""
        return 4 * len(b.members) if self.cfg.tensor_scale != "none" else 0

    def _check_buckets(self, buckets: list[list[torch.Tensor]] | None) -> list[list[torch.Tensor]]:
        """Every optimised parameter in exactly one bucket, in the order given (buckets of nothing dropped)."""
        if buckets is None:
            return [self.params]
        mine = {id(p) for p in self.params}
        seen: dict[int, int] = {}
        for i, ps in enumerate(buckets):
            for p in ps:
                if id(p) not in mine:
                    raise ValueError(f"bucket {i} holds a tensor of shape {tuple(p.shape)} that is not in the "
                                     "optimizer's param groups")
                if id(p) in seen:
                    raise ValueError(f"a tensor of shape {tuple(p.shape)} is in buckets {seen[id(p)]} and {i}")
                seen[id(p)] = i
        missing = [tuple(p.shape) for p in self.params if id(p) not in seen]
        if missing:
            raise ValueError(f"{len(missing)} optimised tensors are in no bucket (shapes {missing[:3]}...)")
        order = {id(p): j for j, p in enumerate(self.params)}  # group order within a bucket
        return [sorted(ps, key=lambda p: order[id(p)]) for ps in buckets if ps]

    def _make_bucket(self, params: list, device: torch.device) -> _Bucket:
        plans, wire = plan_params([local_tensor(p).shape for p in params], self.cfg)
        bucket = _Bucket({id(p): pl for p, pl in zip(params, plans)}, wire, [], list(params))
        ids = {id(p) for p in params}
        bucket.groups = [self._split_group([p for p in g["params"] if id(p) in ids], bucket, device)
                         for g in self.param_groups]
        return bucket

    def _split_group(self, params: list, bucket: _Bucket, device: torch.device) -> "_GroupPlan":
        """A param group's compressed tensors as one ChunkTable per parameter dtype (one launch each), and its
        dense tensors, which sit next to each other in the buffer."""
        by_dtype: dict[torch.dtype, list] = {}
        dense = []
        for p in params:
            plan = bucket.plans[id(p)]
            if plan.layout is not None:
                by_dtype.setdefault(local_tensor(p).dtype, []).append(p)
            elif plan.num_dense:
                dense.append(p)
        tables = []
        for ps in by_dtype.values():
            plans = [bucket.plans[id(p)] for p in ps]
            table = ChunkTable.build([pl.layout for pl in plans], [pl.first_chunk for pl in plans], self.cfg.topk,
                                     device)
            tables.append((table, ps))
        start = bucket.plans[id(dense[0])].dense_offset if dense else 0
        return _GroupPlan(tables, dense, slice(start, start + sum(local_tensor(p).numel() for p in dense)))

    # --- the three phases of a step, public so tests can simulate replicas without process groups ---
    @torch.no_grad()
    def encode(self, bucket: int = 0) -> torch.Tensor:
        """Update the momenta of a bucket's tensors and return this replica's packed payload for it (uint8)."""
        cfg = self.cfg
        # per param group: the rate the momentum folds the gradient in at (with a look-ahead, 1 + nesterov times
        # it), and the look-ahead's part taken back; precondition, or fold_lr=False: lr-free updates (lr at the step)
        rates = []
        for group in self.param_groups:
            lr = group["lr"] if cfg.precondition == "none" and cfg.fold_lr else 1.0
            rates.append((lr * (1 + cfg.nesterov), -cfg.nesterov * lr))
        if self._graphs is None:
            return self._encode(bucket, rates)
        rates = self._device_rates(f"encode{bucket}", rates)
        fed, feed = self._feed(bucket)
        key = ("encode", bucket, self._params_key(bucket), fed)
        return self._graphs.run(key, lambda: self._encode(bucket, rates, feed), self._held_addresses).clone()

    def _encode(self, bucket: int, rates: list, feed: "_Feed | None" = None) -> torch.Tensor:
        """``feed`` (cuda_graphs): the gradients and address tables to read instead of the live ones."""
        cfg, b = self.cfg, self.buckets[bucket]
        grad_of = _local_grad if feed is None else (lambda p: feed.grads[id(p)])
        wire = b.wire
        device = local_tensor(self.params[0]).device
        values = torch.empty(wire.num_sparse + wire.num_dense, dtype=cfg.wire_dtype, device=device)
        indices = torch.empty(wire.num_sparse, dtype=torch.int32, device=device)
        codes = scales = None
        if cfg.value_bits:  # codes the kernels make with the values
            codes = torch.empty(wire.num_sparse, dtype=torch.uint8, device=device)
            scales = torch.empty(wire.num_sparse // cfg.topk, dtype=torch.float32, device=device)
        local = None  # the replica's own gradient moments (tensor_scale, precondition)
        if cfg.tensor_scale != "none" or cfg.precondition != "none":
            local = self._observe(b, grad_of)
        for (lead, back), plan in zip(rates, b.groups):
            for table, ps in plan.tables:
                grads = [_as_2d(self._folded(p, local, grad_of), lay) for p, lay in zip(ps, table.layouts)]
                present = {g.dtype for g in grads if g is not None}
                if len(present) > 1:  # one gradient dtype per launch: the kernel reads them as fp32 anyway
                    grads = [g.float() if g is not None else None for g in grads]
                deltas = [self.state[p]["delta"].view(lay.rows, lay.cols) for p, lay in zip(ps, table.layouts)]
                # with a look-ahead the kernel works on delta + nesterov * lr * grad, taken back below
                ops.encode_table(self.kernels, table, grads, deltas, cfg.beta, lead, values, indices,
                                 self.kernel_options, feed.addresses.get(id(table)) if feed else None,
                                 cfg.value_bits, codes, scales, cfg.sent_keep)
                self._take_back_lead(deltas, grads, back)
            if plan.dense:
                deltas = [self.state[p]["delta"] for p in plan.dense]
                torch._foreach_mul_(deltas, cfg.beta)
                grads = [self._folded(p, local, grad_of) for p in plan.dense]
                adam = cfg.dense_step == "adam"  # gradients sent lr-free, no look-ahead: Adam's moments take them
                _add_scaled(deltas, grads, 1.0 if adam else lead)
                sent = torch.cat([d.reshape(-1) for d in deltas]).to(cfg.wire_dtype)
                values[plan.dense_slice] = sent
                torch._foreach_sub_(deltas, _views_like(sent.float(), deltas))  # residual: only what rounding lost
                if not adam:
                    self._take_back_lead(deltas, grads, back)
        payload = ops.pack_wire(self.kernels, wire, indices, values,
                                torch.empty(wire.nbytes, dtype=torch.uint8, device=device), codes, scales,
                                self.kernel_options)
        if cfg.tensor_scale != "none":
            payload = torch.cat([payload, self._local_scales(b, local).view(torch.uint8)])
        return payload

    def _observe(self, b: _Bucket, grad_of) -> dict[int, torch.Tensor]:
        """This step's gradients into this replica's own moments; returns id(p) -> m / (sqrt(v) + eps) (fp32, the
        local shard's shape) for every member, the update Adam would make (no bias correction: the warm-up covers
        the first steps)."""
        b1, b2 = self.cfg.adam_betas
        st = [self.state[p] for p in b.members]
        live = [(s, g.float()) for s, p in zip(st, b.members) if (g := grad_of(p)) is not None]
        if live:
            grads = [g for _, g in live]
            torch._foreach_lerp_([s["grad_avg"] for s, _ in live], grads, 1 - b1)
            torch._foreach_mul_([s["grad_avg_sq"] for s, _ in live], b2)
            torch._foreach_addcmul_([s["grad_avg_sq"] for s, _ in live], grads, grads, value=1 - b2)
        denom = torch._foreach_add(torch._foreach_sqrt([s["grad_avg_sq"] for s in st]), self.cfg.adam_eps)
        return dict(zip((id(p) for p in b.members), torch._foreach_div([s["grad_avg"] for s in st], denom)))

    def _folded(self, p: torch.Tensor, local: dict | None, grad_of) -> torch.Tensor | None:
        """What ``p``'s momentum folds in this step: its local gradient, or (precondition=adam) its local Adam update;
        None when it has no gradient."""
        g = grad_of(p)
        if g is None:
            return None
        return local[id(p)] if self.cfg.precondition != "none" else g

    def _local_scales(self, b: _Bucket, local: dict[int, torch.Tensor]) -> torch.Tensor:
        """tensor_scale="adam_rms": per member, the RMS of its local Adam update (fp32)."""
        norms = torch._foreach_norm([local[id(p)] for p in b.members])
        sizes = torch.tensor([max(local_tensor(p).numel(), 1) for p in b.members], dtype=torch.float32)
        return (torch.stack(norms).float() / sizes.to(norms[0].device).sqrt()).contiguous()

    def _take_back_lead(self, deltas: list, grads: list, back) -> None:
        """Nesterov look-ahead: the residual keeps delta minus what was sent, not the look-ahead's extra gradient
        (``back`` = -nesterov * lr)."""
        if self.cfg.nesterov:
            _add_scaled(deltas, grads, back)

    # --- cuda_graphs: the phases as captured graphs ---
    def _device_rates(self, name: str, rates: list[tuple]) -> list[tuple]:
        """Per-group tuples of floats -> the same as device scalars that a captured graph reads."""
        flat = self._scalars(name, [float(v) for r in rates for v in r])
        n = len(rates[0]) if rates else 0
        return [tuple(flat[i * n : (i + 1) * n]) for i in range(len(rates))]

    def _params_key(self, bucket: int) -> tuple:
        """Where a bucket's parameters and momenta sit: a captured phase is only valid where they sat. They stay
        put, but loading a state dict replaces the momenta."""
        return tuple((local_tensor(p).data_ptr(), self.state[p]["delta"].data_ptr())
                     for p in self.buckets[bucket].members)

    def _feed(self, bucket: int) -> tuple[tuple, "_Feed"]:
        """The gradients as a captured encode reads them, refreshed for this step, and what the capture depends on
        (which tensors have gradients, of which dtypes). Gradients move from step to step (a backward allocates
        them anew), so none is read where it lies: a table whose gradients only its kernel reads (no look-ahead,
        no preconditioning, one dtype, contiguous) gets this step's address rows copied into a device table of its
        own (a device copy: nothing to wait for); every other gradient (the dense 1-D tensors: small) is copied
        into a buffer of its own, one multi-tensor copy per dtype. Host time matters here: this is what is left of
        the step's Python."""
        cfg, b = self.cfg, self.buckets[bucket]
        by_address = cfg.nesterov == 0 and cfg.precondition == "none"
        feed, key, copies = _Feed({}, {}), [], {}  # copies: dtype -> (destinations, sources)
        for plan in b.groups:
            for table, ps in plan.tables:
                live = [_local_grad(p) for p in ps]
                present = [g for g in live if g is not None]
                one_dtype = len({g.dtype for g in present}) <= 1
                if not (by_address and one_dtype and all(g.is_contiguous() for g in present)):
                    continue
                # contiguous tensors of the layouts' sizes: the table takes them as they lie (no views to build)
                rows = table.addresses(live, [self.state[p]["delta"] for p in ps])
                box = _allocated_once(self._boxes, ("rows", id(table)), rows)
                dst, src = copies.setdefault(rows.dtype, ([], []))
                dst.append(box)
                src.append(rows)
                feed.addresses[id(table)] = box
                feed.grads.update((id(p), g) for p, g in zip(ps, live))
        for p in b.members:
            g = _local_grad(p)
            direct = id(p) in feed.grads
            key.append(None if g is None else (g.dtype, direct))
            if g is None or direct:
                feed.grads[id(p)] = g
                continue
            box = _allocated_once(self._boxes, (id(p), g.dtype), g)
            dst, src = copies.setdefault(g.dtype, ([], []))
            dst.append(box)
            src.append(g)
            feed.grads[id(p)] = box
        for dst, src in copies.values():
            torch._foreach_copy_(dst, src)
        return tuple(key), feed

    def _held_addresses(self) -> list:
        return [table.held_addresses() for b in self.buckets for plan in b.groups for table, _ in plan.tables]

    def exchange(self, payload: torch.Tensor) -> torch.Tensor:
        """(nbytes,) -> (replicas, nbytes): one all-gather over the replicate group."""
        return self.start_exchange(payload, wait=True).wait()

    def start_exchange(self, payload: torch.Tensor, wait: bool = False) -> "_Exchange":
        """Start the all-gather of ``payload``; the returned handle's ``wait()`` gives (replicas, nbytes)."""
        if self.replicas == 1:
            return _Exchange(payload[None], None, payload.device, None)
        send = payload
        if payload.is_cuda and dist.get_backend(self.group) == "gloo":  # a host-side (slow-link) group
            send = payload.cpu()
        out = torch.empty(self.replicas * send.numel(), dtype=send.dtype, device=send.device)
        started = time.perf_counter()
        work = _all_gather_flat(out, send, group=self.group, async_op=not wait)
        # a ring all-gather: R - 1 messages of one payload each
        R = self.replicas
        hold = None if self.link is None else (self.link, (R - 1) * send.numel(), R - 1, started)
        return _Exchange(out.view(self.replicas, -1), work, payload.device, hold)

    @torch.no_grad()
    def decode_apply(self, gathered: torch.Tensor, bucket: int = 0, rates: list | None = None) -> None:
        """Average the replicas' coefficients (replica order 0..R-1), inverse DCT, sign, weight decay, step; at the
        param groups' learning rates and weight decays now, or at ``rates`` ((lr, wd) per group)."""
        steps = self._decode_steps(rates or self._rates())
        if self._graphs is None:
            return self._decode_apply(gathered, bucket, steps)
        steps = self._device_rates(f"decode{bucket}", steps)
        where = (bucket, tuple(gathered.shape), gathered.dtype, gathered.device)
        inbox = _allocated_once(self._inboxes, where, gathered)
        inbox.copy_(gathered)
        key = ("decode", *where, self._params_key(bucket))
        self._graphs.run(key, lambda: self._decode_apply(inbox, bucket, steps), self._held_addresses)

    def _decode_steps(self, rates: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
        """(lr, wd) per group -> (lr, decay, lr of the coefficient sign's chunk step), all three computed here in
        float64, so that as device scalars (cuda_graphs) they hold the bits the kernels get as arguments."""
        gain = UPDATE_RMS * self.cfg.chunk ** 0.5
        return [(lr, 1.0 - lr * wd, lr * gain) for lr, wd in rates]

    def _decode_apply(self, gathered: torch.Tensor, bucket: int, steps: list) -> None:
        bk = self.buckets[bucket]
        scale = None
        if self.cfg.tensor_scale != "none":  # the replicas' scales, averaged in replica order 0..R-1
            at = bk.wire.nbytes
            each = gathered[:, at : at + self._scale_nbytes(bk)].contiguous().view(torch.float32)
            scale = dict(zip((id(p) for p in bk.members), _replica_mean(each).unbind()))
            gathered = gathered[:, :at]
        # (replicas, n) each; values a view of the bytes, or dequantised
        indices, values = ops.unpack_wire(self.kernels, bk.wire, gathered, self.kernel_options)
        # a base step with moments (adam, lion), or a scaled direct step: decode, then step
        # (the coefficient sign steps in its decode, and its dense-sent tensors as the direct step does)
        stepped = self.cfg.base_step not in DECODE_STEPS or scale is not None
        per_chunk = self.cfg.base_step == "orthogonal" and self.cfg.orthogonal_scope == "chunk"
        for (lr, decay, chunk_lr), plan in zip(steps, bk.groups):
            directions = []
            for table, ps in plan.tables:
                if per_chunk or self.cfg.base_step == "coefficient_sign":  # decode, step and apply in one pass
                    targets = [local_tensor(p).view(lay.rows, lay.cols) for p, lay in zip(ps, table.layouts)]
                    if per_chunk:
                        ops.decode_orthogonal_table(self.kernels, table, targets, indices, values, lr, decay,
                                                    self.cfg.orthogonal_precision, self.cfg.replica_mean)
                    else:
                        ops.decode_apply_table(self.kernels, table, targets, indices, values, chunk_lr, decay,
                                               False, self.kernel_options, self.cfg.replica_mean,
                                               coefficient_sign=True)
                    continue
                if stepped:  # decode into zeroed buffers: "p -= -1 * d" leaves d there, signed as configured
                    bufs = [torch.zeros_like(local_tensor(p), dtype=torch.float32) for p in ps]
                    targets = [b.view(lay.rows, lay.cols) for b, lay in zip(bufs, table.layouts)]
                    directions += list(zip(ps, bufs))
                    step_lr, step_decay = -1.0, 1.0
                else:
                    targets = [local_tensor(p).view(lay.rows, lay.cols) for p, lay in zip(ps, table.layouts)]
                    step_lr, step_decay = lr, decay
                ops.decode_apply_table(self.kernels, table, targets, indices, values, step_lr, step_decay,
                                       self.cfg.sign and self.cfg.base_step != "orthogonal", self.kernel_options,
                                       self.cfg.replica_mean)
                if self.cfg.base_step == "orthogonal":
                    orthogonalize_all(ps, bufs, self.cfg.orthogonal_precision)
            if plan.dense:
                update = _replica_mean(values[:, plan.dense_slice].float())
                locals_ = [local_tensor(p) for p in plan.dense]
                if self.cfg.dense_step == "adam":  # (a decode step: not ``stepped``)
                    update = torch.cat([x.reshape(-1) for x in
                                        self._adam_update(plan.dense, _views_like(update, locals_))])
                elif self.cfg.sign:
                    update = update.sign()
                if stepped:
                    directions += list(zip(plan.dense, _views_like(update, locals_)))
                else:
                    flat = torch.cat([x.reshape(-1).float() for x in locals_])
                    torch._foreach_copy_(locals_, _views_like(flat * decay - lr * update, locals_))
            if directions and scale is not None:
                steps = [d for _, d in directions]
                torch._foreach_mul_(steps, [scale[id(p)] for p, _ in directions])
                _descend([p for p, _ in directions], steps, lr, decay)
            elif directions and self.cfg.base_step == "orthogonal":
                _descend([p for p, _ in directions], [d for _, d in directions], lr, decay)
            elif directions:
                step = self._adam_step if self.cfg.base_step == "adam" else self._lion_step
                step([p for p, _ in directions], [d for _, d in directions], lr, decay)

    def _lion_step(self, params: list, directions: list[torch.Tensor], lr: float, decay: float) -> None:
        """p = p * decay - lr * sign(b1 m + (1 - b1) d); then m = b2 m + (1 - b2) d."""
        b1, b2 = self.cfg.adam_betas
        m = [self.state[p]["exp_avg"] for p in params]
        step = torch._foreach_mul(m, b1)
        torch._foreach_add_(step, directions, alpha=1 - b1)
        torch._foreach_sign_(step)
        torch._foreach_lerp_(m, directions, 1 - b2)
        _descend(params, step, lr, decay)

    def _adam_update(self, params: list, directions: list[torch.Tensor]) -> list[torch.Tensor]:
        """The moving moments m, v of ``directions`` updated in ``params``' state; returns m / (sqrt(v) + eps)."""
        b1, b2 = self.cfg.adam_betas
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(m, directions, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, directions, directions, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.cfg.adam_eps)
        return torch._foreach_div(m, denom)

    def _adam_step(self, params: list, directions: list[torch.Tensor], lr: float, decay: float) -> None:
        """p = p * decay - lr * m / (sqrt(v) + eps), with m, v the moving moments of the decoded directions."""
        _descend(params, self._adam_update(params, directions), lr, decay)

    def _rates(self) -> list[tuple[float, float]]:
        return [(g["lr"], g["weight_decay"]) for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rates = self._rates()
        # stale: the previous step's updates, now; layerwise: those of layers that ran no forward since (none when
        # attached: each was applied just before its layer's forward)
        self.apply_pending()
        payloads = [self.encode(i) for i in range(len(self.buckets))]
        self._pending = [_Pending(i, self.start_exchange(x), rates) for i, x in enumerate(payloads)]
        if self.cfg.overlap == "off":
            self.apply_pending()
        self.last_comm = self.comm_bytes()
        return loss

    @torch.no_grad()
    def apply_pending(self, bucket: int | None = None) -> None:
        """Wait for the exchanges in flight and apply their updates, in bucket order: all of them, or those of
        buckets up to ``bucket`` (a layer's hook: the exchanges arrive in the order they were started)."""
        while self._pending and (bucket is None or self._pending[0].bucket <= bucket):
            job = self._pending.pop(0)
            self.decode_apply(job.exchange.wait(), job.bucket, job.rates)

    def flush(self) -> None:
        """Apply the updates still in flight (overlap): before a checkpoint, so it holds every update made, and at
        the end of training. A no-op otherwise."""
        self.apply_pending()

    def attach(self, modules: list[torch.nn.Module]) -> list:
        """overlap="layerwise": ``modules[i]`` applies bucket i's update (and any before it) just before its forward.
        Returns the hook handles."""
        if len(modules) != len(self.buckets):
            raise ValueError(f"{len(modules)} modules for {len(self.buckets)} buckets: one module per bucket")
        # FSDP2 may copy the shards into its all-gather on a stream of its own: on a GPU the update must be in
        # memory before that copy reads it
        sync = any(hasattr(p, "to_local") for p in self.params) and local_tensor(self.params[0]).is_cuda
        handles = []
        for i, m in enumerate(modules):
            @torch.compiler.disable  # a compiled model calls it eagerly (it waits on a collective)
            def hook(module, args, i=i):
                self.apply_pending(i)
                if sync:
                    torch.cuda.current_stream().synchronize()
            handles.append(m.register_forward_pre_hook(hook, prepend=True))
        return handles

    def comm_bytes(self) -> dict[str, float]:
        """Per-rank bytes on the replicate group this step, and what a dense bf16 all-reduce would have cost."""
        R = self.replicas
        numel = sum(local_tensor(p).numel() for p in self.params)
        nbytes = self.payload_nbytes
        sent = (R - 1) * nbytes  # ring all-gather: each rank forwards R - 1 payloads
        dense = 2 * (R - 1) / R * numel * 2 if R > 1 else 0.0  # ring all-reduce of bf16 gradients
        return {"replicate_sent_bytes": float(sent), "replicate_recv_bytes": float(sent),
                "payload_bytes": float(nbytes), "dense_bf16_payload_bytes": float(numel * 2),
                "dense_bf16_allreduce_bytes": float(dense),
                "compression": float(numel * 2 / nbytes) if nbytes else float("inf")}


def DeMo(params: Iterable, lr: float = 1e-3, config: DeMoConfig | None = None, **overrides) -> FlexDeMo:
    """DeMo as in the paper: unsharded replicas, every rank of the default group exchanging with every other."""
    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return FlexDeMo(params, replicate_group=group, lr=lr, config=config, **overrides)
