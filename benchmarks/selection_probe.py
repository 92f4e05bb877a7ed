"""Offline measurements of a selection rule on a checkpoint: approximation quality and kept-batch bias.

    python benchmarks/selection_probe.py --checkpoint runs/study/warm --config configs/study.yaml \
        --data data/study-s64-v4096 --batches 20 --oversample 2 4 --json out.json

For candidate batches of m * oversample samples from the train stream (fixed masks, seed 0) it
scores every candidate with the exit-layer loss at each k = 1..L (L = exact) and reports, per k and
oversample: Spearman rank correlation with the exact loss and with the samples' token rarity, top-m
overlap with exact top-m, and the
mean unigram cross-entropy of the masked tokens in the kept top-m vs the whole pool (unigram counts
from the same stream: the rare-word bias the issue-7 pilots saw), for top-m by loss (sift) and by
the rarity residual (sift_resid); and how much of the ranking is BERT's 10% random replacement: the
Spearman correlation of the score with a sample's share of random-replaced positions (a model that
copies its input scores those very badly), and that share in the kept top-m vs the pool.
Forward passes only (no_grad).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.sift import agreement, policies, scoring  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import train_loader  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.checkpoint import load_module_weights  # noqa: E402
from pipeline.masking import MaskSpec, mask_spec  # noqa: E402


def unigram_log_probs(manifest: Manifest, spec: MaskSpec, batches: int, batch: int) -> torch.Tensor:
    counts = torch.ones(manifest.vocab_size, dtype=torch.float64)
    loader, _ = train_loader(manifest, spec, batch=batch, epoch=0, seed=1, rank=0, world=1, start=0,
                             shuffle_buffer=2000, strict=False, num_workers=0)
    for i, b in enumerate(loader):
        if i >= batches:
            break
        targets = b["labels"][b["labels"] >= 0]
        counts += torch.bincount(targets, minlength=manifest.vocab_size).double()
    return (counts / counts.sum()).log()


def mean_unigram_ce(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    targets = labels[labels >= 0]
    return float(-log_probs[targets].mean()) if targets.numel() else math.nan


def replaced_share(inputs: torch.Tensor, labels: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Per sample: the share of its labelled positions whose input is a random token (not [MASK], not kept)."""
    labelled = labels >= 0
    replaced = labelled & (inputs != mask_id) & (inputs != labels)
    return replaced.sum(dim=1).double() / labelled.sum(dim=1).clamp(min=1).double()


def measure(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(str(args.config), [f"data.dir={args.data}"])
    manifest = Manifest.load(str(args.data))
    spec = mask_spec(cfg.data, manifest)
    model = build_model(cfg.model, manifest.vocab_size, manifest.seq_len, manifest.special_ids)
    load_module_weights(model, str(args.checkpoint))
    model.eval()
    layers = model.num_layers
    log_probs = unigram_log_probs(manifest, spec, 200, 64)
    m = cfg.train.micro_batch
    rows = []
    for oversample in args.oversample:
        loader, _ = train_loader(manifest, spec, batch=m * oversample, epoch=0, seed=0, rank=0, world=1, start=0,
                                 shuffle_buffer=2000, strict=False, num_workers=0)
        acc = {k: {"spearman": [], "overlap": [], "kept_ce": [], "rarity_rho": [], "kept_ce_resid": [],
                   "replaced_rho": [], "kept_replaced": []} for k in range(0, layers + 1)}
        pool_ce, pool_replaced = [], []
        for i, batch in enumerate(loader):
            if i >= args.batches:
                break
            labels = batch["labels"]
            pool_ce.append(mean_unigram_ce(log_probs, labels))
            scores = {}
            for k in range(0, layers + 1):
                loss, count = scoring.exit_layer_losses(model, batch["input_ids"], labels, k)
                scores[k] = scoring.selection_scores(loss, count)
            exact = scores[layers]
            finite = torch.isfinite(exact)
            token_ce = -log_probs[labels[labels >= 0]].float()
            rarity, _ = scoring.per_sample_loss(token_ce, (labels >= 0).nonzero(as_tuple=True)[0], labels.shape[0])
            replaced = replaced_share(batch["input_ids"], labels, spec.mask_id)
            pool_replaced.append(float(replaced.mean()))
            for k, s in scores.items():
                acc[k]["spearman"].append(agreement.spearman(s[finite], exact[finite]))
                acc[k]["overlap"].append(agreement.topk_overlap(s, exact, m))
                acc[k]["kept_ce"].append(mean_unigram_ce(log_probs, labels[policies.topk_keep(s, m)]))
                acc[k]["rarity_rho"].append(agreement.spearman(s[finite], rarity[finite]))
                resid = policies.unigram_residual_scores(s, rarity)
                acc[k]["kept_ce_resid"].append(mean_unigram_ce(log_probs, labels[policies.topk_keep(resid, m)]))
                acc[k]["replaced_rho"].append(agreement.spearman(s[finite], replaced[finite]))
                acc[k]["kept_replaced"].append(float(replaced[policies.topk_keep(s, m)].mean()))
        pool = sum(pool_ce) / len(pool_ce)
        for k, a in acc.items():
            rows.append({"oversample": oversample, "exit_layer": k, "exact": k == layers,
                         "spearman": sum(a["spearman"]) / len(a["spearman"]),
                         "topk_overlap": sum(a["overlap"]) / len(a["overlap"]),
                         "kept_unigram_ce": sum(a["kept_ce"]) / len(a["kept_ce"]), "pool_unigram_ce": pool,
                         "rarity_spearman": sum(a["rarity_rho"]) / len(a["rarity_rho"]),
                         "kept_unigram_ce_resid": sum(a["kept_ce_resid"]) / len(a["kept_ce_resid"]),
                         "replaced_spearman": sum(a["replaced_rho"]) / len(a["replaced_rho"]),
                         "kept_replaced_share": sum(a["kept_replaced"]) / len(a["kept_replaced"]),
                         "pool_replaced_share": sum(pool_replaced) / len(pool_replaced)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="run dir or checkpoint step dir")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "study.yaml")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--oversample", type=int, nargs="+", default=[2, 4])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args)
    print("| oversample | exit layer | Spearman vs exact | top-m overlap | Spearman vs rarity | kept unigram CE "
          "(sift) | kept unigram CE (sift_resid) | pool unigram CE | Spearman vs replaced share | "
          "replaced share kept (sift) / pool |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['oversample']} | {r['exit_layer']}{' (exact)' if r['exact'] else ''} | {r['spearman']:.3f} | "
              f"{r['topk_overlap']:.3f} | {r['rarity_spearman']:.3f} | {r['kept_unigram_ce']:.3f} | "
              f"{r['kept_unigram_ce_resid']:.3f} | {r['pool_unigram_ce']:.3f} | {r['replaced_spearman']:.3f} | "
              f"{r['kept_replaced_share']:.3f} / {r['pool_replaced_share']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
