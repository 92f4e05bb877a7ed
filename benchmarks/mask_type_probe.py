"""Where a checkpoint's MLM accuracy comes from: [MASK] positions vs kept and random-replaced ones.

    python benchmarks/mask_type_probe.py --data data/study-s64-v4096 \
        --checkpoint runs/study/warm [--checkpoint other/run ...] --samples 2048 --json out.json

BERT's masking turns 80% of the chosen tokens into [MASK], 10% into a random token and leaves 10%
as they are. On a kept position the answer is in the input, so a model that only learns to copy
its input there and to guess frequent words elsewhere already scores ~0.1: the "plateau" of the
issue-7 pilots. This splits the validation loss and accuracy (the trainer's fixed eval masks) by
position type, so a run's accuracy regime can be read off: has it learnt anything from context at
the [MASK] positions, or is it copying and guessing? The context-free baselines (the most frequent
train token; the unigram cross-entropy) are printed beside them. Forward passes only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.selection_probe import unigram_log_probs  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import eval_batches  # noqa: E402
from pipeline.masking import mask_spec  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.checkpoint import load_module_weights  # noqa: E402

POSITION_TYPES = ("mask", "random", "kept")


def position_types(inputs: torch.Tensor, targets: torch.Tensor, mask_id: int) -> dict[str, torch.Tensor]:
    """Boolean masks over the N labelled positions: [MASK] in the input, the label kept, or replaced."""
    is_mask = inputs == mask_id
    is_kept = ~is_mask & (inputs == targets)
    return {"mask": is_mask, "random": ~is_mask & ~is_kept, "kept": is_kept}


@torch.no_grad()
def split_metrics(model: torch.nn.Module, batches: list[dict], mask_id: int) -> dict[str, dict[str, float]]:
    sums = {t: torch.zeros(3, dtype=torch.float64) for t in (*POSITION_TYPES, "all")}  # loss, correct, count
    model.eval()
    for batch in batches:
        labels = batch["labels"]
        out = model(batch["input_ids"], labels)
        token_loss = F.cross_entropy(out.logits.float(), out.targets, reduction="none").double()
        correct = (out.logits.argmax(dim=-1) == out.targets).double()
        kinds = position_types(batch["input_ids"][labels >= 0], out.targets, mask_id)
        kinds["all"] = torch.ones_like(out.targets, dtype=torch.bool)
        for kind, where in kinds.items():
            sums[kind] += torch.stack([token_loss[where].sum(), correct[where].sum(), where.sum().double()])
    return {kind: {"loss": (s[0] / s[2]).item(), "accuracy": (s[1] / s[2]).item(), "tokens": int(s[2])}
            for kind, s in sums.items() if s[2] > 0}


def context_free_baselines(log_probs: torch.Tensor, batches: list[dict], mask_id: int) -> dict[str, float]:
    """Accuracy of always answering the most frequent token, and the unigram cross-entropy, at [MASK]."""
    targets = torch.cat([b["labels"][(b["labels"] >= 0) & (b["input_ids"] == mask_id)] for b in batches])
    return {"most_frequent_accuracy": (targets == log_probs.argmax()).double().mean().item(),
            "unigram_ce": (-log_probs[targets]).mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", required=True,
                   help="run dir or checkpoint step dir (repeat to compare several)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "study.yaml")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--samples", type=int, default=2048, help="validation rows")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(str(args.config), [f"data.dir={args.data}"])
    manifest = Manifest.load(str(args.data))
    mask_id = manifest.special_ids["mask"]
    spec = mask_spec(cfg.data, manifest)
    batches = eval_batches(manifest, spec, samples=args.samples, batch=64, rank=0, world=1)
    baselines = context_free_baselines(unigram_log_probs(manifest, spec, 200, 64), batches, mask_id)
    print(f"context-free at [MASK]: most-frequent-token accuracy {baselines['most_frequent_accuracy']:.4f}, "
          f"unigram cross-entropy {baselines['unigram_ce']:.3f}")
    print("| checkpoint | all: acc | all: loss | [MASK]: acc | [MASK]: loss | kept: acc | random: acc | "
          "[MASK] / kept / random tokens |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for checkpoint in args.checkpoint:
        model = build_model(cfg.model, manifest.vocab_size, manifest.seq_len, manifest.special_ids)
        load_module_weights(model, str(checkpoint))
        m = split_metrics(model, batches, mask_id)
        results.append({"checkpoint": str(checkpoint), **m})
        print(f"| {checkpoint} | {m['all']['accuracy']:.4f} | {m['all']['loss']:.3f} | {m['mask']['accuracy']:.4f} | "
              f"{m['mask']['loss']:.3f} | {m['kept']['accuracy']:.4f} | {m['random']['accuracy']:.4f} | "
              f"{m['mask']['tokens']} / {m['kept']['tokens']} / {m['random']['tokens']} |")
    if args.json:
        args.json.write_text(json.dumps({"baselines": baselines, "checkpoints": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
