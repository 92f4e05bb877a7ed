"""How well one ranking of candidates matches another: the probe's exit-layer vs exact-loss metrics."""
from __future__ import annotations

import torch

from pipeline.sift.policies import topk_keep


def topk_overlap(approx: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """|top-k by approx ∩ top-k by exact| / k."""
    keep_a = set(topk_keep(approx, k).tolist())
    keep_e = set(topk_keep(exact, k).tolist())
    return len(keep_a & keep_e) / k


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    for value in torch.unique(x):  # average ranks over ties
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
