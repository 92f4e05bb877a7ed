"""Sample selection as small pure torch functions: no DeepSpeed, no MLflow, no model.

Scores are per-sample losses of shape (B,); every function returns the indices of the samples to
keep, sorted ascending so that the kept batch keeps the loader's order.
"""
from __future__ import annotations

import torch


def per_sample_loss(token_loss: torch.Tensor, sample_index: torch.Tensor, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the masked tokens' losses per sample -> (loss (B,), masked-token count (B,)).

    A sample without masked tokens gets loss 0 and count 0."""
    total = torch.zeros(batch_size, dtype=torch.float32, device=token_loss.device)
    count = torch.zeros(batch_size, dtype=torch.float32, device=token_loss.device)
    total.index_add_(0, sample_index, token_loss.float())
    count.index_add_(0, sample_index, torch.ones_like(token_loss, dtype=torch.float32))
    return total / count.clamp(min=1.0), count


def selection_scores(loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Samples with no masked token can teach nothing: they rank below every other sample."""
    return torch.where(count > 0, loss, torch.full_like(loss, float("-inf")))


def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy selection: the k largest scores; ties go to the earlier sample (stable sort)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} samples")
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def unigram_residual_scores(scores: torch.Tensor, unigram_ce: torch.Tensor) -> torch.Tensor:
    """Scores with their linear dependence on token rarity removed (policy sift_resid).

    `unigram_ce` (B,) is each sample's mean unigram cross-entropy of its masked tokens. Early in
    MLM training the per-sample loss is mostly that rarity, so top-k by loss keeps rare-word
    batches (docs/RESULTS.md). Returns loss - (a + b * unigram_ce) with a, b the least-squares fit
    over this batch's finite scores, so the kept samples are those more surprising than their
    words' rarity predicts; samples without masked tokens stay at -inf."""
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


def labels_at_mask_tokens(input_ids: torch.Tensor, labels: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The labels of the positions whose input is [MASK]; the others set to -100 (policy sift_mask).

    BERT's masking leaves 10% of the chosen positions unchanged and replaces 10% by a random token.
    A model that has learnt to copy its input is near-certain (and right) on the kept ones and
    confidently wrong on the replaced ones, so their losses say how many replacements a sample drew,
    not how much it has left to teach (docs/RESULTS.md). Scoring only the [MASK] positions leaves the
    trained batch unchanged: the kept samples still train on all their labelled positions."""
    return torch.where(input_ids == mask_id, labels, torch.full_like(labels, -100))


def random_keep(batch_size: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniform random subset of k samples (controls for the data that oversampling consumes)."""
    if not 0 < k <= batch_size:
        raise ValueError(f"cannot keep {k} of {batch_size} samples")
    return torch.sort(torch.randperm(batch_size, generator=generator)[:k]).values


def loss_percentile(scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Fraction of the history at or below each score (Jiang et al. 2019's CDF), in [0, 1]."""
    if history.numel() == 0:
        return torch.full_like(scores, 0.5)
    return (history.unsqueeze(0) <= scores.unsqueeze(1)).float().mean(dim=1)


def selective_backprop_probs(scores: torch.Tensor, history: torch.Tensor, beta: float) -> torch.Tensor:
    """Selective-Backprop keep probabilities: percentile of the loss in the history, to the power beta."""
    return loss_percentile(scores, history).pow(beta)


def selective_backprop_keep(scores: torch.Tensor, history: torch.Tensor, beta: float, k: int,
                            generator: torch.Generator) -> torch.Tensor:
    """Static-shape Selective-Backprop: draw k samples without replacement, weighted by keep prob.

    Jiang et al. keep each sample independently and fill a buffer until a batch is full; drawing
    exactly k with those weights keeps the engine's micro-batch fixed."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} samples")
    probs = selective_backprop_probs(scores, history, beta)
    weights = torch.where(torch.isfinite(scores), probs, torch.zeros_like(probs)) + 1e-12
    return torch.sort(torch.multinomial(weights, k, replacement=False, generator=generator)).values


def update_history(history: torch.Tensor, scores: torch.Tensor, length: int) -> torch.Tensor:
    """Append finite scores, keep the newest `length`."""
    return torch.cat([history, scores[torch.isfinite(scores)].float()])[-length:]


def is_active(step: int, max_steps: int, active_from: float, active_to: float, every: int) -> bool:
    """The selection schedule: on between two fractions of training, on every n-th step."""
    fraction = step / max(max_steps, 1)
    return active_from <= fraction < active_to + 1e-12 and step % every == 0


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
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    for value in torch.unique(x):  # average ranks over ties
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
