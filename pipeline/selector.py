"""The pre-step hook: turn a candidate micro-batch of m * oversample samples into the m to train on.

A thin stateful wrapper around the pure functions in pipeline/selection.py; its state (random
generator, loss history, unigram counts) is saved in checkpoints so that a resumed run selects
exactly as an uninterrupted one would.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from pipeline import selection
from pipeline.config import SelectConfig
from pipeline.scoring import exit_layer_losses


@dataclass
class SelectionStats:
    scoring_s: float = 0.0
    kept_loss: float = math.nan
    dropped_loss: float = math.nan
    kept_unigram_ce: float = math.nan
    pool_unigram_ce: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)


class Selector:
    def __init__(self, cfg: SelectConfig, *, micro_batch: int, num_layers: int, vocab_size: int,
                 max_steps: int, seed: int, rank: int, mask_id: int | None = None) -> None:
        self.cfg, self.m, self.max_steps = cfg, micro_batch, max_steps
        if cfg.policy == "sift_mask" and mask_id is None:
            raise ValueError("select.policy sift_mask needs the tokenizer's [MASK] id")
        self.mask_id = mask_id
        self.exit_layer = num_layers if cfg.policy in ("exact", "selective_backprop") else cfg.exit_layer
        if not 0 <= self.exit_layer <= num_layers:
            raise ValueError(f"select.exit_layer {self.exit_layer} is outside 0..{num_layers} "
                             f"(the model has {num_layers} layers)")
        self.num_layers = num_layers
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
        self.history = torch.empty(0)
        self.unigram = torch.ones(vocab_size, dtype=torch.float64)  # add-one counts of masked targets

    def select(self, mlm: torch.nn.Module, batch: dict, step: int) -> tuple[dict, SelectionStats]:
        """Returns the kept micro-batch (always m samples) and statistics for logging."""
        stats = SelectionStats()
        labels = batch["labels"]
        self._count_unigrams(labels)
        if self.cfg.policy == "vanilla":
            return batch, stats
        if not selection.is_active(step, self.max_steps, self.cfg.active_from, self.cfg.active_to, self.cfg.every):
            return _take(batch, torch.arange(self.m)), stats
        if self.cfg.policy == "random":
            keep = selection.random_keep(labels.shape[0], self.m, self.generator)
        else:
            start = time.perf_counter()
            scored = (selection.labels_at_mask_tokens(batch["input_ids"], labels, self.mask_id)
                      if self.cfg.policy == "sift_mask" else labels)
            loss, count = exit_layer_losses(mlm, batch["input_ids"], scored, self.exit_layer)
            scores = selection.selection_scores(loss, count)
            if self.cfg.policy == "sift_resid":
                token_ce = -(self.unigram / self.unigram.sum()).log()[labels[labels >= 0]].float()
                rarity, _ = selection.per_sample_loss(token_ce, (labels >= 0).nonzero(as_tuple=True)[0],
                                                      labels.shape[0])
                keep = selection.topk_keep(selection.unigram_residual_scores(scores, rarity), self.m)
            elif self.cfg.policy == "selective_backprop":
                keep = selection.selective_backprop_keep(scores, self.history, self.cfg.sb_beta, self.m,
                                                         self.generator)
                self.history = selection.update_history(self.history, scores, self.cfg.sb_history)
            else:
                keep = selection.topk_keep(scores, self.m)
            stats.scoring_s = time.perf_counter() - start
            dropped = torch.ones_like(loss, dtype=torch.bool)
            dropped[keep] = False
            stats.kept_loss = float(loss[keep].mean())
            stats.dropped_loss = float(loss[dropped].mean()) if dropped.any() else math.nan
        stats.kept_unigram_ce = self._unigram_ce(labels[keep])
        stats.pool_unigram_ce = self._unigram_ce(labels)
        return _take(batch, keep), stats

    def probe(self, mlm: torch.nn.Module, batch: dict) -> dict[str, float]:
        """How well the exit-layer ranking matches the exact-loss ranking on one candidate batch."""
        approx, count = exit_layer_losses(mlm, batch["input_ids"], batch["labels"], self.cfg.exit_layer)
        exact, _ = exit_layer_losses(mlm, batch["input_ids"], batch["labels"], self.num_layers)
        approx, exact = selection.selection_scores(approx, count), selection.selection_scores(exact, count)
        finite = torch.isfinite(exact)
        k = min(self.m, int(finite.sum()))
        if k == 0:
            return {}
        return {"probe/topk_overlap": selection.topk_overlap(approx, exact, k),
                "probe/spearman": selection.spearman(approx[finite], exact[finite])}

    def _count_unigrams(self, labels: torch.Tensor) -> None:
        targets = labels[labels >= 0]
        self.unigram += torch.bincount(targets, minlength=self.unigram.numel()).double()

    def _unigram_ce(self, labels: torch.Tensor) -> float:
        targets = labels[labels >= 0]
        if targets.numel() == 0:
            return math.nan
        probs = self.unigram / self.unigram.sum()
        return float(-probs[targets].log().mean())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "history": self.history.clone(),
                "unigram": self.unigram.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.history = state["history"]
        self.unigram = state["unigram"]


def _take(batch: dict, keep: torch.Tensor) -> dict:
    return {"keys": [batch["keys"][i] for i in keep.tolist()],
            "input_ids": batch["input_ids"][keep],  # (m, T)
            "labels": batch["labels"][keep]}
