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
from pipeline.sift.scoring import exit_layer_losses, labels_at_mask_tokens, per_sample_loss, selection_scores


@dataclass
class SelectionStats:
    scoring_s: float = 0.0
    scoring_cpu_s: float = 0.0  # this process's CPU seconds (benchmarks on a shared machine read these)
    kept_loss: float = math.nan
    dropped_loss: float = math.nan
    kept_unigram_ce: float = math.nan
    pool_unigram_ce: float = math.nan


class Selector:
    def __init__(self, cfg: SelectConfig, *, micro_batch: int, exit_layer: int | None, num_layers: int,
                 vocab_size: int, max_steps: int, seed: int, rank: int, mask_id: int) -> None:
        """`exit_layer` is the layer this policy scores at (pipeline.config.exit_layer_run), None if none."""
        self.cfg, self.m, self.max_steps = cfg, micro_batch, max_steps
        self.policy = POLICIES[cfg.policy]
        self.exit_layer, self.num_layers, self.mask_id = exit_layer, num_layers, mask_id
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
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

    def select(self, model: torch.nn.Module, batch: dict, step: int, fraction: float | None = None
               ) -> tuple[dict, SelectionStats]:
        """Returns the kept micro-batch (always m samples) and statistics for logging. `fraction` is how
        far through its budget the run is (pipeline.schedule.budget_fraction); default step / max_steps."""
        stats = SelectionStats()
        labels = batch["labels"]
        self._count_unigrams(labels)
        if not self.policy.oversamples:
            return batch, stats
        size = labels.shape[0]
        fraction = step / max(self.max_steps, 1) if fraction is None else fraction
        if not self.active(step, fraction):
            return _take(batch, keep_first(Pool(size, self.m, self.generator))), stats
        if self.policy.scored_at is None:
            keep = self.policy.keep(Pool(size, self.m, self.generator))
        else:
            start, start_cpu = time.perf_counter(), time.process_time()
            scored = (labels_at_mask_tokens(batch["input_ids"], labels, self.mask_id)
                      if self.policy.mask_positions_only else labels)
            loss, count = exit_layer_losses(model, batch["input_ids"], scored, self.exit_layer)
            scores = selection_scores(loss, count)
            self.history = self.history.to(scores.device)
            rarity = self._rarity(labels) if self.policy.needs_rarity else None
            keep = self.policy.keep(Pool(size, self.m, self.generator, scores, rarity, self.history, self.cfg.sb_beta))
            if self.policy.needs_history:
                self.history = update_history(self.history, scores, self.cfg.sb_history)
            stats.scoring_s, stats.scoring_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
            dropped = torch.ones_like(loss, dtype=torch.bool)
            dropped[keep] = False
            stats.kept_loss = float(loss[keep].mean())
            stats.dropped_loss = float(loss[dropped].mean()) if dropped.any() else math.nan
        stats.kept_unigram_ce = self._unigram_ce(labels[keep])
        stats.pool_unigram_ce = self._unigram_ce(labels)
        return _take(batch, keep), stats

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
        self.unigram = self.unigram.to(labels.device)
        targets = labels[labels >= 0]
        self.unigram += torch.bincount(targets, minlength=self.unigram.numel()).double()

    def _rarity(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) mean unigram cross-entropy of each sample's masked tokens."""
        token_ce = -(self.unigram / self.unigram.sum()).log()[labels[labels >= 0]].float()
        return per_sample_loss(token_ce, (labels >= 0).nonzero(as_tuple=True)[0], labels.shape[0])[0]

    def _unigram_ce(self, labels: torch.Tensor) -> float:
        targets = labels[labels >= 0]
        if targets.numel() == 0:
            return math.nan
        probs = self.unigram / self.unigram.sum()
        return float(-probs[targets].log().mean())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "history": self.history.cpu().clone(),
                "unigram": self.unigram.cpu().clone(), "started_at_step": self.started_at_step}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.history = state["history"]
        self.unigram = state["unigram"]
        self.started_at_step = state.get("started_at_step", self.started_at_step)


def _take(batch: dict, keep: torch.Tensor) -> dict:
    return {"keys": [batch["keys"][i] for i in keep.tolist()],
            "input_ids": batch["input_ids"][keep],  # (m, T)
            "labels": batch["labels"][keep]}
