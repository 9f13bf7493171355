"""DeMo's settings, validated on construction (no hydra here: flexmore's configs convert into this)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexdemo.ops.decode_reference import REPLICA_MEANS
from flexdemo.ops.newton_schulz_reference import PRECISIONS as NS_PRECISIONS
from flexdemo.ops.options import KernelOptions
from flexdemo.quant import VALUE_BITS
from flexdemo.wire import INDEX_CODINGS, WIRE_DTYPES, index_bits_for

# -> the Triton encode's forward_precision (None: its fp32 products for the wire: bf16x3, or tf32x3 for an fp32 wire)
DCT_FORWARD = {"fp32": None, "tf32": "tf32", "bf16": "bf16"}
DCT_INVERSE = {"fp32": "bf16x3", "tf32": "tf32"}  # -> the Triton decode's precision
BASE_STEPS = ("direct", "adam", "lion", "orthogonal", "coefficient_sign")
# the base steps whose decode applies the update itself, the dense-sent tensors by a sign: no moments, no host work
# between the kernels (what cuda_graphs captures, and what dense_step=adam replaces the dense sign of)
DECODE_STEPS = ("direct", "coefficient_sign")
ORTHOGONAL_SCOPES = ("matrix", "chunk")
ORTHOGONAL_PRECISIONS = tuple(NS_PRECISIONS)  # the iteration's (fp32, bf16), as its twin and kernel check them
OVERLAPS = ("off", "stale", "layerwise")
TENSOR_SCALES = ("none", "adam_rms")
PRECONDITIONS = ("none", "adam")
DENSE_STEPS = ("sign", "adam")
MOMENTUM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the compressed tensors' residual, stored
# DeMo's own wire (bf16 values, 12-bit indices: 71.5x less than dense bf16 for `base` on 2 x 2), the default before
# 2026-12-05: what the benchmarks name when they measure against it
DEMO_WIRE = {"value_bits": 0, "index_coding": "fixed"}


@dataclass  # not frozen: hydra composes it as a structured config (optim.demo)
class DeMoConfig:
    """Defaults follow the public DeMo code (β = 0.999, k = 32 of 64 x 64, signs, no weight decay) but for the base
    step: the coefficient sign, measured nearer AdamW's loss than DeMo's direct step (base_step=direct), at its cost;
    and for the wire: values as 2-bit codes and each chunk's positions Elias-Fano coded (168.7x fewer bytes than a
    dense bf16 all-reduce for `base` on 2 x 2, against 71.5x for DeMo's bf16 values and 12-bit indices: value_bits=0,
    index_coding=fixed). (flexmore's training sets the weight decay, 0.1 on matrices by default:
    conf/optim/flexdemo.yaml.)"""

    beta: float = 0.999  # decay of the error-feedback momentum
    topk: int = 32  # coefficients sent per chunk
    chunk: int = 64  # chunks are chunk x chunk tiles of each 2-D shard
    sign: bool = True  # apply sign(decoded update) (DeMo) or the decoded update itself
    weight_decay: float = 0.0  # decoupled: p *= 1 - lr * wd
    value_dtype: str = "bf16"  # bf16 | fp32 | fp16: dtype of the sent coefficients
    index_bits: int = 0  # 0 = smallest that holds chunk*chunk (12 for 64x64), or 12 / 16
    # "fixed": index_bits a position; "elias_fano": each chunk's k positions sorted and coded in one fixed-size
    # Elias-Fano code (flexdemo.elias_fano: 36 bytes for 32 of 64 x 64, against 48), the same update, lossless
    index_coding: str = "elias_fano"
    # 0: sent values in value_dtype; 2 / 4 / 8: as codes of that many bits with a bf16 scale per chunk, the
    # quantisation error kept in the momentum (flexdemo.quant; computed inside the encode kernel: at k 28 with 2 bits
    # the step takes ~5% more time than with bf16 values); 1: each value's sign at its chunk's scale, the momentum
    # losing the whole value as unquantised (flexdemo.quant.SIGN_BITS)
    value_bits: int = 2
    kernels: str = "auto"  # auto (Triton on CUDA) | torch | triton
    # Triton encode's forward DCT: fp32 (three bf16 tensor-core products, each factor to 16 significant bits: the
    # fp32 reference's set but for near-ties within ~2^-15, 1 chunk in 2000 on random data; tf32x3, ~2^-21, for
    # value_dtype=fp32) or tf32 (one pass, 11% less encode time; ~5e-4 relative error: 3% of chunks swap a near-tie,
    # a quarter of the sent values move one bf16 step) or bf16 (one bf16 pass: factors to 8 significant bits, so
    # more near-ties swap; for 2-bit codes, whose steps are a third of the scale). Either way the momentum loses
    # exactly what was sent. The torch path takes fp32 products, or for tf32 / bf16 rounds the same factors
    # (``encode_reference.forward_dct``: CPU runs measure what the setting costs).
    dct_forward: str = "fp32"
    # Triton decode's inverse DCT: fp32 (three bf16 tensor-core products, each factor to 16 significant bits: within
    # ~6e-6 of the largest update, and the fastest) or tf32 (one tensor-core pass: the basis rounds to 2^-11 relative;
    # a sign may flip where the update is within ~1e-3 of zero; slower than fp32 (measured), kept for
    # comparison). Replicas stay bit-identical either way.
    dct_inverse: str = "fp32"
    # What the decoded direction d (the replicas' mean, signed if ``sign``) does to the weights: "direct" (DeMo):
    # p -= lr * d; "adam": d is the gradient of an Adam step (its own first and second moments, ``adam_betas``,
    # ``adam_eps``; no bias correction: the warm-up covers the first steps), which scales each element by its history;
    # "lion": p -= lr * sign(b1 * m + (1 - b1) * d), then m = b2 * m + (1 - b2) * d (Lion's rule on the decoded
    # direction, ``adam_betas`` as (b1, b2); best with sign=False, so m averages magnitudes, not signs);
    # "orthogonal": each compressed matrix's decoded direction, unsigned, is orthogonalised (Newton-Schulz, as Muon
    # does to its momentum: every singular value near 1) and scaled to AdamW's typical update RMS (0.2 sqrt(max(rows,
    # cols)) times the orthogonal factor), so AdamW's learning rates apply; the dense-sent tensors step by sign(d).
    # ``orthogonal_scope``: "matrix" (the whole matrix: gathered over the node's shard group under FSDP) or "chunk"
    # (each whole s x s decoded chunk on its own: local; decode, step and apply in one pass, the iteration run on the
    # chunk's coefficient tile, where only the rows and columns the replicas sent into are nonzero:
    # flexdemo.ops.decode_orthogonal). ``orthogonal_precision``: the Newton-Schulz products in "fp32" or "bf16" (as
    # Muon computes them: the iteration only needs singular values near 1, which bf16's rounding leaves; per chunk
    # within ~2-4% of the fp32 step).
    # "coefficient_sign": each chunk's mean coefficients replaced by their signs before the inverse DCT, scaled as the
    # orthogonal step per chunk is (UPDATE_RMS sqrt(s)): that step exactly where no two sent coefficients share a row
    # or a column of the chunk's coefficient tile (the block is then a signed permutation, whose orthogonal factor is
    # its sign pattern), at the cost of the direct step's decode; the dense-sent tensors step by sign(d). The default:
    # nearer AdamW's loss than the direct step (benchmarks/README.md), at AdamW's learning rates or a few times them.
    base_step: str = "coefficient_sign"
    orthogonal_scope: str = "matrix"
    orthogonal_precision: str = "fp32"
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    # The exchange overlapped with the next step's compute. "stale": step t's all-gather runs while step t + 1's
    # forward and backward compute, and its update is applied at step t + 1 (Psyche's and bloc97's scheme): every
    # update one step late, which costs loss (measured). "layerwise": one all-gather per bucket of parameters (a
    # layer), each bucket's update applied just before that layer's next forward (``FlexDeMo.attach``): the same
    # numbers as "off", with the exchange hidden behind the forward of the layers before. ``flush`` applies what is
    # in flight.
    overlap: str = "off"
    # The share of each sent DCT coefficient (of what its code stands for) the momentum keeps instead of losing it
    # all (0: DeMo's error feedback). A coefficient sent step after step then carries a momentum of rate ~beta *
    # sent_keep (DeMo's sends each such step's own gradient alone), and one sent once keeps a head start. The
    # dense-sent tensors lose all they send, as before. Replicas stay bit-identical (each keeps part of its own
    # residual).
    sent_keep: float = 0.0
    # Nesterov-style look-ahead: each step sends the top-k of delta + nesterov * lr * grad (the fresh gradient counted
    # once more) and keeps delta minus what was sent, so the momentum leads the update and error feedback pays the
    # lead back the next step. 0: DeMo.
    nesterov: float = 0.0
    # Each tensor's step (direct base step) times a scale: "adam_rms", the RMS over the tensor (each rank's shard)
    # of the update Adam would make from the local gradient (moments at ``adam_betas``, ``adam_eps``), averaged over
    # the replicas (one fp32 per tensor at the end of the payload), so a tensor whose gradient is mostly noise takes
    # smaller steps. "none": DeMo.
    tensor_scale: str = "none"
    # What each replica folds into its momentum: "none" (DeMo) its gradient, times lr; "adam" its own Adam update of
    # the gradient, m / (sqrt(v) + eps) from moments of its local gradient (``adam_betas``, ``adam_eps``), lr then
    # applied at the step. The error feedback then compresses Adam's steps instead of gradients: with everything
    # sent, sign=False and one replica, FlexDeMo is Adam (without bias correction) with decoupled weight decay.
    precondition: str = "none"
    # Whether the momentum folds in lr * gradient (DeMo) or the gradient alone (lr applied at the step only). With
    # lr folded in, as a schedule anneals the residual stays ruled by what it gathered at the peak rate (β = 0.999
    # remembers ~1,000 steps), so the sign steps keep following stale gradients; without it every step's gradient
    # counts alike. (precondition=adam always folds its updates lr-free.)
    fold_lr: bool = True
    # How the replicas' coefficients are averaged per position: "senders" (DeMo) over the replicas that sent it, so
    # a coefficient one replica picked from its own noisy momentum weighs as much as one all R agree on; "all" over
    # all R (the sum / R): the mean of what the replicas took out of their momenta, which is what error feedback
    # keeps account of. The same at R = 1 and for the dense-sent tensors; no counting in the decode.
    replica_mean: str = "senders"
    # How the dense-sent tensors (those a top-k payload would not shrink: norm gains, biases) step on the replicas'
    # mean of what they sent: "sign" (DeMo): p -= lr * sign(mean), the whole momentum sent each step, so a sign of
    # one step's gradient; "adam": their gradients sent lr-free and an Adam step on the mean (moments at
    # ``adam_betas``, ``adam_eps``, no bias correction; the same numbers on every replica), as AdamW steps them.
    # For base_step=direct or coefficient_sign (the other base steps already step them by their own rule).
    dense_step: str = "sign"
    # Encode and decode + apply each replayed as a captured CUDA graph (flexdemo.graphs): for a model of many small
    # tensors, whose step is bound by the host queueing its launches. Triton kernels on CUDA, base_step=direct or
    # coefficient_sign, tensor_scale=none only; the same bits as without. A phase runs eagerly at its first step, is
    # captured at its second and replayed after (the rates read from device memory, the gradients wherever the
    # backward put them).
    cuda_graphs: bool = False
    # The compressed tensors' momentum (the residual) as stored between steps: fp32, or bf16 (the encode computes in
    # fp32 and rounds the residual to nearest once per step): the encode then moves 8 bytes per element instead of
    # 12, and the state takes half the memory. The dense-sent tensors keep fp32. Not with a look-ahead (nesterov),
    # which adds and takes back a gradient around the encode (two more roundings).
    momentum_dtype: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("fold_lr", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):  # a string such as "no" would otherwise read as true
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.cuda_graphs and (self.base_step not in DECODE_STEPS or self.tensor_scale != "none"):
            raise ValueError(f"cuda_graphs=true captures base_step={' or '.join(DECODE_STEPS)} only; got base_step="
                             f"{self.base_step!r}, tensor_scale={self.tensor_scale!r} (use one of those, tensor_scale="
                             "none, or cuda_graphs=false)")
        if self.precondition not in PRECONDITIONS:
            raise ValueError(f"precondition={self.precondition!r}; allowed: {', '.join(PRECONDITIONS)}")
        if self.precondition != "none" and self.base_step != "direct":
            raise ValueError(f"precondition={self.precondition!r} folds Adam's steps into the momentum, to be "
                             f"applied by the direct step; got base_step={self.base_step!r} (add base_step=direct)")
        if self.dense_step not in DENSE_STEPS:
            raise ValueError(f"dense_step={self.dense_step!r}; allowed: {', '.join(DENSE_STEPS)}")
        if self.dense_step != "sign" and (self.base_step not in DECODE_STEPS or self.precondition != "none"
                                          or self.tensor_scale != "none"):
            raise ValueError(f"dense_step={self.dense_step!r} steps the dense-sent tensors of base_step="
                             f"{' or '.join(DECODE_STEPS)} (no precondition, tensor_scale=none); got base_step="
                             f"{self.base_step!r}, precondition={self.precondition!r}, tensor_scale="
                             f"{self.tensor_scale!r} (use dense_step=sign)")
        if self.replica_mean not in REPLICA_MEANS:
            raise ValueError(f"replica_mean={self.replica_mean!r}; allowed: {', '.join(REPLICA_MEANS)}")
        if self.tensor_scale not in TENSOR_SCALES:
            raise ValueError(f"tensor_scale={self.tensor_scale!r}; allowed: {', '.join(TENSOR_SCALES)}")
        if self.tensor_scale != "none" and self.base_step != "direct":
            raise ValueError(f"tensor_scale={self.tensor_scale!r} scales the direct step; got base_step="
                             f"{self.base_step!r} (add base_step=direct)")
        if not 0.0 <= self.sent_keep < 1.0:
            raise ValueError(f"sent_keep={self.sent_keep} must be in [0, 1) (0: the momentum loses all it sent)")
        if not (self.nesterov >= 0 and self.nesterov < float("inf")):
            raise ValueError(f"nesterov={self.nesterov} must be a finite number >= 0")
        if self.momentum_dtype not in MOMENTUM_DTYPES:
            raise ValueError(f"momentum_dtype={self.momentum_dtype!r}; allowed: {', '.join(MOMENTUM_DTYPES)}")
        if self.momentum_dtype != "fp32" and self.nesterov:
            raise ValueError(f"momentum_dtype={self.momentum_dtype!r} stores the residual rounded once per step; "
                             f"nesterov={self.nesterov} would round it twice more (use momentum_dtype=fp32 or "
                             "nesterov=0)")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap={self.overlap!r}; allowed: {', '.join(OVERLAPS)}")
        if self.base_step not in BASE_STEPS:
            raise ValueError(f"base_step={self.base_step!r}; allowed: {', '.join(BASE_STEPS)}")
        if self.orthogonal_scope not in ORTHOGONAL_SCOPES:
            raise ValueError(f"orthogonal_scope={self.orthogonal_scope!r}; allowed: {', '.join(ORTHOGONAL_SCOPES)}")
        if self.orthogonal_precision not in ORTHOGONAL_PRECISIONS:
            raise ValueError(f"orthogonal_precision={self.orthogonal_precision!r}; allowed: "
                             f"{', '.join(ORTHOGONAL_PRECISIONS)}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas={list(self.adam_betas)}: two values in [0, 1)")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps={self.adam_eps} must be > 0")
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk} must be >= 1")
        if not 1 <= self.topk <= self.chunk * self.chunk:
            raise ValueError(f"topk={self.topk} must be in [1, chunk*chunk={self.chunk * self.chunk}] (chunk={self.chunk})")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta={self.beta} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.value_dtype not in WIRE_DTYPES:
            raise ValueError(f"value_dtype={self.value_dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
        index_bits_for(self.chunk, self.index_bits)
        if self.index_coding not in INDEX_CODINGS:
            raise ValueError(f"index_coding={self.index_coding!r}; allowed: {', '.join(INDEX_CODINGS)}")
        if self.index_coding == "elias_fano" and self.index_bits:
            raise ValueError(f"index_bits={self.index_bits} sets the width of fixed indices; with "
                             f"index_coding=elias_fano leave it 0 (or set index_coding=fixed)")
        if self.value_bits not in VALUE_BITS:
            raise ValueError(f"value_bits={self.value_bits}; allowed: {', '.join(map(str, VALUE_BITS))} "
                             f"(0: unquantised, 1: signs)")
        from flexdemo.ops import KERNELS

        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r}; allowed: {', '.join(KERNELS)}")
        if self.dct_forward not in DCT_FORWARD:
            raise ValueError(f"dct_forward={self.dct_forward!r}; allowed: {', '.join(DCT_FORWARD)}")
        if self.dct_inverse not in DCT_INVERSE:
            raise ValueError(f"dct_inverse={self.dct_inverse!r}; allowed: {', '.join(DCT_INVERSE)}")

    def kernel_options(self) -> KernelOptions:
        """The Triton kernels' products as dct_forward / dct_inverse ask, the rest at their measured defaults."""
        return KernelOptions(forward_precision=DCT_FORWARD[self.dct_forward],
                             decode_precision=DCT_INVERSE[self.dct_inverse])

    @property
    def wire_dtype(self):
        return WIRE_DTYPES[self.value_dtype]

    @property
    def resolved_index_bits(self) -> int:
        return index_bits_for(self.chunk, self.index_bits)

    @property
    def elias_fano_positions(self) -> int:
        """The positions a chunk's Elias-Fano code chooses among (s*s), or 0 for fixed-width indices."""
        return self.chunk * self.chunk if self.index_coding == "elias_fano" else 0
