"""The pre-step hook: turn a candidate micro-batch of m * oversample samples into the m to train on.

A thin stateful wrapper around the pure policies (pipeline/sift/policies.py) and the exit-layer
scorer (pipeline/sift/scoring.py). Its state (random generator, loss history, unigram counts) is
saved in checkpoints, so a resumed run selects exactly as an uninterrupted one would. Candidates
are scored where they lie: the caller moves the batch to the engine's device first.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pipeline.config import Config, SelectConfig, exit_layer_run
from pipeline.sift import agreement
from pipeline.sift.policies import POLICIES, Pool, is_active, keep_first, update_history
from pipeline.masking import head_capacity
from pipeline.sift.scoring import exit_layer_losses, labels_at_mask_tokens, selection_scores


@dataclass
class SelectionStats:
    """What one selection measured. The losses and cross-entropies stay tensors on the device until the
    log window reads them all at once: a float() here would stall a GPU every micro-step."""
    scoring_s: float = 0.0  # host time (on a GPU: the launch, unless the scorer synced)
    scoring_cpu_s: float = 0.0  # this process's CPU seconds (benchmarks on a shared machine read these)
    kept_loss: torch.Tensor | float = math.nan
    dropped_loss: torch.Tensor | float = math.nan
    kept_unigram_ce: torch.Tensor | float = math.nan
    pool_unigram_ce: torch.Tensor | float = math.nan


class Selector:
    def __init__(self, cfg: SelectConfig, *, micro_batch: int, exit_layer: int | None, num_layers: int,
                 vocab_size: int, max_steps: int, seed: int, rank: int, mask_id: int) -> None:
        """`exit_layer` is the layer this policy scores at (pipeline.config.exit_layer_run), None if none."""
        self.cfg, self.m, self.max_steps = cfg, micro_batch, max_steps
        self.policy = POLICIES[cfg.policy]
        self.exit_layer, self.num_layers, self.mask_id = exit_layer, num_layers, mask_id
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
        self.capacity_prob: float | None = None  # set: the scorer's head runs at static shapes (mask_prob)
        # select.start_at_mask_accuracy: selection waits for the regime; the loop calls start() after the eval
        self.started_at_step = -1 if cfg.start_at_mask_accuracy > 0 else 0
        self.history = torch.empty(0)
        self.unigram = torch.ones(vocab_size, dtype=torch.float64)  # add-one counts of masked targets

    @classmethod
    def for_run(cls, cfg: Config, *, vocab_size: int, mask_id: int, rank: int = 0) -> "Selector":
        """The selector of a run: its policy, micro-batch, exit layer, schedule and seed from the config."""
        return cls(cfg.select, micro_batch=cfg.train.micro_batch, exit_layer=exit_layer_run(cfg),
                   num_layers=cfg.model.shape[0], vocab_size=vocab_size, max_steps=cfg.train.max_steps,
                   seed=cfg.train.seed, rank=rank, mask_id=mask_id)

    @property
    def waiting(self) -> bool:
        """True while selection waits for eval/mask_accuracy to reach select.start_at_mask_accuracy."""
        return self.started_at_step < 0

    def start(self, step: int) -> None:
        self.started_at_step = step

    def active(self, step: int, fraction: float) -> bool:
        """Selecting at this step: started, inside select.active_from..active_to, on an every-th step."""
        c = self.cfg
        return not self.waiting and is_active(fraction, step, c.active_from, c.active_to, c.every)

    def select(self, model: torch.nn.Module, batch: dict, step: int, fraction: float | None = None,
               with_keys: bool = True) -> tuple[dict, SelectionStats]:
        """Returns the kept micro-batch (always m samples) and statistics for logging. `fraction` is how
        far through its budget the run is (pipeline.schedule.budget_fraction); default step / max_steps.
        The kept sample keys are listed only `with_keys` (reading the kept indices is a host sync)."""
        stats = SelectionStats()
        labels = batch["labels"]
        self._count_unigrams(labels)
        if not self.policy.oversamples:
            return batch, stats
        size = labels.shape[0]
        fraction = step / max(self.max_steps, 1) if fraction is None else fraction
        if not self.active(step, fraction):
            return _take(batch, keep_first(Pool(size, self.m, self.generator)), with_keys), stats
        if self.policy.scored_at is None:
            keep = self.policy.keep(Pool(size, self.m, self.generator))
        else:
            start, start_cpu = time.perf_counter(), time.process_time()
            scored = (labels_at_mask_tokens(batch["input_ids"], labels, self.mask_id)
                      if self.policy.mask_positions_only else labels)
            capacity = None if self.capacity_prob is None else \
                head_capacity(size, labels.shape[1], self.capacity_prob)
            loss, count = exit_layer_losses(model, batch["input_ids"], scored, self.exit_layer, capacity)
            scores = selection_scores(loss, count)
            self.history = self.history.to(scores.device)
            rarity = self._rarity(labels) if self.policy.needs_rarity else None
            keep = self.policy.keep(Pool(size, self.m, self.generator, scores, rarity, self.history, self.cfg.sb_beta))
            if self.policy.needs_history:
                self.history = update_history(self.history, scores, self.cfg.sb_history)
            stats.scoring_s, stats.scoring_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
            dropped = torch.ones_like(loss)
            dropped[keep] = 0.0
            stats.kept_loss = loss[keep].mean()
            stats.dropped_loss = (loss * dropped).sum() / dropped.sum()  # oversample >= 2: some are dropped
        stats.kept_unigram_ce = self._unigram_ce(labels[keep])
        stats.pool_unigram_ce = self._unigram_ce(labels)
        return _take(batch, keep, with_keys), stats

    def probe(self, model: torch.nn.Module, batch: dict) -> dict[str, float]:
        """How well the exit-layer ranking matches the exact-loss ranking on one candidate batch."""
        approx, count = exit_layer_losses(model, batch["input_ids"], batch["labels"], self.cfg.exit_layer)
        exact, _ = exit_layer_losses(model, batch["input_ids"], batch["labels"], self.num_layers)
        approx, exact = selection_scores(approx, count), selection_scores(exact, count)
        finite = torch.isfinite(exact)
        k = min(self.m, int(finite.sum()))
        if k == 0:
            return {}
        return {"probe/topk_overlap": agreement.topk_overlap(approx, exact, k),
                "probe/spearman": agreement.spearman(approx[finite], exact[finite])}

    def _count_unigrams(self, labels: torch.Tensor) -> None:
        """Add-one counts of the masked targets, by masks rather than a data-dependent selection (no sync)."""
        self.unigram = self.unigram.to(labels.device)
        masked = labels >= 0
        self.unigram.index_add_(0, labels.clamp(min=0).reshape(-1), masked.reshape(-1).double())

    def _token_ce(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) unigram cross-entropy of each masked target (0 elsewhere), and the mask."""
        masked = labels >= 0
        log_probs = (self.unigram / self.unigram.sum()).log()
        return -log_probs[labels.clamp(min=0)].float() * masked, masked

    def _rarity(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) mean unigram cross-entropy of each sample's masked tokens."""
        token_ce, masked = self._token_ce(labels)
        return token_ce.sum(dim=1) / masked.sum(dim=1).clamp(min=1)

    def _unigram_ce(self, labels: torch.Tensor) -> torch.Tensor:
        """The mean unigram cross-entropy of the batch's masked targets (NaN if it has none)."""
        token_ce, masked = self._token_ce(labels)
        return token_ce.sum() / masked.sum()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "history": self.history.cpu().clone(),
                "unigram": self.unigram.cpu().clone(), "started_at_step": self.started_at_step}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.history = state["history"]
        self.unigram = state["unigram"]
        self.started_at_step = state.get("started_at_step", self.started_at_step)


def _take(batch: dict, keep: torch.Tensor, with_keys: bool = True) -> dict:
    kept = {"input_ids": batch["input_ids"][keep],  # (m, T)
            "labels": batch["labels"][keep]}
    if with_keys:
        kept["keys"] = [batch["keys"][i] for i in keep.tolist()]
    return kept
