"""Low-rank experts from a trained full expert: truncated SVD of each projection's delta to the public FFN.

Delta = W_expert - W_public = U S V^T;  B = U[:, :r] sqrt(S[:r]),  A = sqrt(S[:r]) V^T[:r]   (the symmetric split).
A rank at or past the break-even d f / (d + f) is stored as the dense matrix W_public + B A, since the factors
would cost more; at r >= min(d, f) that is the exact expert (the delta itself, no SVD rounding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmore.experts.artifact import ExpertManifest, save_artifact
from flexmore.model.experts import PROJECTIONS, Ranks, stored_dense


@dataclass
class RankReport:
    layer: int
    projection: str
    rank: int
    energy: float  # sum of the kept S^2 over the total
    rel_error: float  # ||Delta - B A||_F / ||Delta||_F
    dense: bool  # stored as a dense matrix (rank at or past break-even)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in), S) of the best rank-r approximation, computed in float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float(), s


def extract_lowrank(public: dict[str, torch.Tensor], expert: dict[str, torch.Tensor], n_layers: int,
                    ranks: list[int], device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], list[str],
                                                                                  list[RankReport]]:
    """Artifact tensors of a rank-[g, u, d] low-rank expert from a full expert's tensors.

    ``public`` maps ``layers.{i}.{proj}.weight`` to the public FFN's weights; ``expert`` holds the full expert's
    artifact tensors. Returns (tensors, projections stored dense, report rows), on the CPU. ``device``: where the
    SVDs run (a GPU's float64 keeps them off the CPU, which concurrent sweep shards share).
    """
    ranks = Ranks.of(ranks).as_list()
    out, report, dense_names = {}, [], set()
    for i in range(n_layers):
        for name, r in zip(PROJECTIONS, ranks):
            key = f"layers.{i}.{name}.weight"
            w_pub, w_exp = public[key].float().to(device), expert[key].float().to(device)
            delta = w_exp - w_pub
            out_f, in_f = delta.shape
            total = float((delta.double() ** 2).sum())
            if r >= min(out_f, in_f):
                out[key] = w_exp.cpu().clone()  # exact: no SVD
                report.append(RankReport(i, name, r, 1.0, 0.0, True))
                dense_names.add(name)
                continue
            b, a, s = svd_factors(delta, r)
            energy = float((s[:r] ** 2).sum() / total) if total > 0 else 1.0
            err = float(torch.linalg.norm(delta.double() - b.double() @ a.double()) / max(total, 1e-300) ** 0.5) if total > 0 else 0.0
            dense = stored_dense(r, out_f, in_f)
            if dense:
                out[key] = (w_pub + b @ a).cpu()
                dense_names.add(name)
            else:
                out[f"layers.{i}.{name}.A"], out[f"layers.{i}.{name}.B"] = a.cpu().contiguous(), b.cpu().contiguous()
            report.append(RankReport(i, name, r, energy, err, dense))
    for k, v in expert.items():  # router row, bias, public row: unchanged
        if not any(f".{p}." in k for p in PROJECTIONS):
            out[k] = v.clone()
    return out, sorted(dense_names, key=PROJECTIONS.index), report


def save_lowrank(out: str | Path, public: dict[str, torch.Tensor], expert: dict[str, torch.Tensor],
                 manifest: ExpertManifest, n_layers: int, ranks: list[int],
                 overwrite: bool = False, device: torch.device | str = "cpu") -> tuple[Path, ExpertManifest,
                                                                                       list[RankReport]]:
    """Extract a full expert at ``ranks`` and write it as the artifact ``out`` (named after the folder): the one place a
    low-rank artifact's manifest is made (provenance copied from the full expert's, the mean retained energy added).
    Returns (folder, manifest, report rows)."""
    out = Path(out)
    tensors, dense, report = extract_lowrank(public, expert, n_layers, ranks, device)
    man = dataclasses.replace(
        manifest, name=out.name, kind="lowrank", ranks=Ranks.of(ranks).as_list(), dense_projections=dense,
        params=sum(v.numel() for k, v in tensors.items() if not k.endswith("router_public")),
        energy=sum(r.energy for r in report) / len(report), extracted_from=manifest.name, imported_from=None)
    return save_artifact(out, tensors, man, overwrite=overwrite), man, report
