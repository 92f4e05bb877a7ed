"""Selection policies as small pure functions: one candidate pool in, the indices to keep out.

Each policy is a function `Pool -> kept indices` (sorted ascending, so the kept batch keeps the
loader's order) and one entry in POLICIES, which also says what the hook must compute for it:
whether candidates are oversampled, where they are scored (at select.exit_layer or the last layer),
and whether only [MASK] positions count. No DeepSpeed, no MLflow, no model here: the tests feed
hand-made scores. Adding a policy is one function and one table entry.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pool:
    """What a policy sees of one candidate micro-batch."""
    size: int  # candidates
    k: int  # how many to keep (the micro-batch m)
    generator: torch.Generator  # the hook's own, saved in checkpoints
    scores: torch.Tensor | None = None  # (size,) approximate losses, -inf for samples that cannot teach
    rarity: torch.Tensor | None = None  # (size,) mean unigram cross-entropy of each sample's masked tokens
    history: torch.Tensor | None = None  # recent finite scores (selective_backprop)
    beta: float = 1.0  # selective_backprop's exponent


def _check_k(k: int, size: int) -> None:
    if not 0 < k <= size:
        raise ValueError(f"cannot keep {k} of {size} samples")


def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy selection: the k largest scores; ties go to the earlier sample (stable sort)."""
    _check_k(k, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def keep_first(pool: Pool) -> torch.Tensor:
    """The first k candidates: what vanilla trains, and what any policy trains while it is inactive."""
    _check_k(pool.k, pool.size)
    return torch.arange(pool.k)


def keep_random(pool: Pool) -> torch.Tensor:
    """A uniform random subset of k (controls for the extra data that oversampling consumes)."""
    _check_k(pool.k, pool.size)
    return torch.sort(torch.randperm(pool.size, generator=pool.generator)[:pool.k]).values


def keep_top(pool: Pool) -> torch.Tensor:
    """SIFT: the k largest approximate losses."""
    return topk_keep(pool.scores, pool.k)


def unigram_residual_scores(scores: torch.Tensor, unigram_ce: torch.Tensor) -> torch.Tensor:
    """Scores with their linear dependence on token rarity removed (policy sift_resid).

    Early in MLM training the per-sample loss is mostly the rarity of the masked words, so top-k by
    loss keeps rare-word batches (docs/PLATEAU_STUDY.md). Returns loss - (a + b * unigram_ce), a and b the
    least-squares fit over this batch's finite scores: the kept samples are those more surprising
    than their words' rarity predicts. Samples without masked tokens stay at -inf."""
    finite = torch.isfinite(scores)
    out = torch.full_like(scores, float("-inf"))
    if int(finite.sum()) < 2:
        out[finite] = 0.0
        return out
    y, x = scores[finite].double(), unigram_ce[finite].double()
    x_centered = x - x.mean()
    denom = float((x_centered * x_centered).sum())
    slope = float((x_centered * (y - y.mean())).sum()) / denom if denom > 0 else 0.0
    out[finite] = (y - y.mean() - slope * x_centered).to(scores.dtype)
    return out


def keep_top_residual(pool: Pool) -> torch.Tensor:
    return topk_keep(unigram_residual_scores(pool.scores, pool.rarity), pool.k)


def loss_percentile(scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Fraction of the history at or below each score (Jiang et al. 2019's CDF), in [0, 1]."""
    if history.numel() == 0:
        return torch.full_like(scores, 0.5)
    return (history.unsqueeze(0) <= scores.unsqueeze(1)).float().mean(dim=1)


def keep_selective_backprop(pool: Pool) -> torch.Tensor:
    """Static-shape Selective-Backprop: draw k without replacement, weighted by percentile ** beta.

    Jiang et al. keep each sample independently and fill a buffer until a batch is full; drawing
    exactly k with those weights keeps the engine's micro-batch fixed."""
    _check_k(pool.k, pool.size)
    probs = loss_percentile(pool.scores, pool.history).pow(pool.beta)
    weights = torch.where(torch.isfinite(pool.scores), probs, torch.zeros_like(probs)) + 1e-12
    # the draw runs on the CPU, where the hook's generator lives (a no-op for CPU scores)
    return torch.sort(torch.multinomial(weights.cpu(), pool.k, replacement=False, generator=pool.generator)).values


def update_history(history: torch.Tensor, scores: torch.Tensor, length: int) -> torch.Tensor:
    """Append finite scores, keep the newest `length`."""
    return torch.cat([history, scores[torch.isfinite(scores)].float()])[-length:]


def is_active(fraction: float, step: int, active_from: float, active_to: float, every: int) -> bool:
    """The selection schedule: on between two fractions of the budget, on every n-th step."""
    return active_from <= fraction < active_to + 1e-12 and step % every == 0


@dataclass(frozen=True)
class Policy:
    keep: Callable[[Pool], torch.Tensor]
    oversamples: bool = True  # draws m * select.oversample candidates
    scored_at: str | None = None  # None, "exit" (select.exit_layer) or "last" (the last layer)
    mask_positions_only: bool = False  # score only the positions whose input is [MASK]
    needs_rarity: bool = False
    needs_history: bool = False


POLICIES: dict[str, Policy] = {
    "vanilla": Policy(keep_first, oversamples=False),
    "random": Policy(keep_random),
    "sift": Policy(keep_top, scored_at="exit"),
    "exact": Policy(keep_top, scored_at="last"),
    "selective_backprop": Policy(keep_selective_backprop, scored_at="last", needs_history=True),
    # experiments from docs/PLATEAU_STUDY.md: rarity removed from the score; scored at [MASK] positions only
    "sift_resid": Policy(keep_top_residual, scored_at="exit", needs_rarity=True),
    "sift_mask": Policy(keep_top, scored_at="exit", mask_positions_only=True),
}
