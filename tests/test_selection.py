"""The selection policies and scoring arithmetic on hand-made losses (no model, no DeepSpeed)."""
import math

import pytest
import torch

from pipeline.sift import agreement, policies, scoring
from pipeline.sift.policies import Pool


def test_per_sample_loss_is_mean_over_each_samples_masked_tokens():
    token_loss = torch.tensor([1.0, 3.0, 5.0, 2.0])
    sample_index = torch.tensor([0, 0, 2, 2])
    loss, count = scoring.per_sample_loss(token_loss, sample_index, batch_size=3)
    assert loss.tolist() == [2.0, 0.0, 3.5]
    assert count.tolist() == [2.0, 0.0, 2.0]


def test_topk_keeps_exactly_the_largest_in_loader_order():
    scores = torch.tensor([0.3, 2.0, 0.1, 5.0, 1.0, 0.2])
    assert policies.topk_keep(scores, 3).tolist() == [1, 3, 4]


def test_topk_ties_go_to_the_earlier_sample_every_time():
    scores = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    for _ in range(5):
        assert policies.topk_keep(scores, 2).tolist() == [1, 3]
    assert policies.topk_keep(scores, 4).tolist() == [0, 1, 3, 5]


def test_sample_without_masked_tokens_is_never_kept_over_one_with_some():
    loss, count = scoring.per_sample_loss(torch.tensor([0.01, 0.02]), torch.tensor([1, 2]), batch_size=4)
    scores = scoring.selection_scores(loss, count)  # samples 0 and 3 have no masked token
    assert policies.topk_keep(scores, 2).tolist() == [1, 2]
    assert math.isinf(scores[0].item()) and scores[0] < 0


def test_topk_rejects_impossible_k():
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        policies.topk_keep(torch.zeros(4), 5)


def test_random_keep_is_uniform():
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    trials = 4000
    for _ in range(trials):
        keep = policies.keep_random(Pool(8, 2, generator))
        assert keep.tolist() == sorted(set(keep.tolist())) and len(keep) == 2
        counts[keep] += 1
    expected = trials * 2 / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


def test_selective_backprop_prob_is_percentile_to_the_beta():
    history = torch.arange(1.0, 11.0)  # 1..10
    probs = policies.loss_percentile(torch.tensor([0.5, 5.0, 10.0]), history).pow(2.0)
    assert torch.allclose(probs, torch.tensor([0.0, 0.25, 1.0]))


def test_selective_backprop_keeps_high_losses_more_often():
    generator = torch.Generator().manual_seed(1)
    history = torch.linspace(0, 1, 100)
    scores = torch.tensor([0.05, 0.5, 0.95, 0.9])
    kept = torch.zeros(4)
    for _ in range(2000):
        kept[policies.keep_selective_backprop(Pool(len(scores), 2, generator, scores, history=history, beta=1.0))] += 1
    assert kept[2] > kept[1] > kept[0] and kept[3] > kept[1]


def test_history_keeps_the_newest_finite_losses():
    history = policies.update_history(torch.tensor([1.0, 2.0]), torch.tensor([3.0, float("-inf"), 4.0]), 3)
    assert history.tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("step,active", [(0, False), (24, False), (25, True), (26, False), (50, True), (75, False)])
def test_schedule_active_between_fractions_every_nth_step(step, active):
    assert policies.is_active(step / 100, step, active_from=0.25, active_to=0.7, every=25) is active


def test_overlap_and_spearman():
    exact = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert agreement.topk_overlap(exact * 2, exact, 2) == 1.0
    assert agreement.topk_overlap(-exact, exact, 2) == 0.0
    assert agreement.spearman(exact ** 3, exact) == pytest.approx(1.0)
    assert agreement.spearman(-exact, exact) == pytest.approx(-1.0)
    assert agreement.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.866, abs=1e-3)


def test_unigram_residual_removes_the_rarity_trend_and_keeps_the_surprising_samples():
    rarity = torch.arange(1.0, 9.0)  # mean unigram CE of each sample's masked tokens
    surprise = torch.tensor([1.0, -1.0] * 4)  # +1: harder than its words' rarity predicts
    scores = 2.0 * rarity + surprise
    assert policies.topk_keep(scores, 4).tolist() == [4, 5, 6, 7]  # plain top-k: the rarest words
    residual = policies.unigram_residual_scores(scores, rarity)
    assert policies.topk_keep(residual, 4).tolist() == [0, 2, 4, 6]
    assert abs(float(residual.sum())) < 1e-5
    linear = policies.unigram_residual_scores(3.0 - 0.5 * rarity, rarity)
    assert torch.allclose(linear, torch.zeros(8), atol=1e-5)  # nothing beyond rarity: all equal


def test_unigram_residual_keeps_samples_without_masked_tokens_last():
    scores = torch.tensor([float("-inf"), 2.0, 5.0, float("-inf")])
    residual = policies.unigram_residual_scores(scores, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    assert torch.isinf(residual[[0, 3]]).all() and (residual[[0, 3]] < 0).all()
    assert policies.topk_keep(residual, 2).tolist() == [1, 2]
    single = policies.unigram_residual_scores(torch.tensor([float("-inf"), 4.0]), torch.tensor([0.0, 3.0]))
    assert single.tolist() == [float("-inf"), 0.0]


def test_labels_at_mask_tokens_keeps_only_the_mask_positions():
    mask = 4
    inputs = torch.tensor([[2, 4, 9, 7, 4, 3]])  # [CLS] [MASK] kept(9) random(7 for 8) [MASK] [SEP]
    labels = torch.tensor([[-100, 11, 9, 8, 12, -100]])
    assert scoring.labels_at_mask_tokens(inputs, labels, mask).tolist() == [[-100, 11, -100, -100, 12, -100]]


def test_a_nan_score_ranks_last_not_first():
    """A NaN sorts first in a descending sort, so a NaN-scored sample would always be kept; scores
    map NaN (and inf) to -inf. Checked to fail with the isfinite test taken out of selection_scores."""
    loss = torch.tensor([0.5, float("nan"), 2.0, 1.0, float("inf")])
    scores = scoring.selection_scores(loss, torch.ones(5))
    assert policies.topk_keep(scores, 2).tolist() == [2, 3]
    assert torch.isinf(scores[[1, 4]]).all() and (scores[[1, 4]] < 0).all()
