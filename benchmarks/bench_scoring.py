"""Where exit-layer scoring spends its time, and the pipeline's scorer vs its earlier version.

    python benchmarks/bench_scoring.py --preset mini --n 64 --exits 0 1 --threads 1   # ~40 s of CPU
    python benchmarks/bench_scoring.py --preset base --n 16 --exits 1 --threads 1     # ~30 s of CPU

Arms, interleaved in one process, no_grad, eval mode, on the same candidate batch of n samples:
  pipeline     pipeline.sift.scoring.exit_layer_losses as it is now;
  ce_twice     the scorer before the change recorded in docs/BENCHMARKS.md: pipeline.model.sparse_mlm
               (head + a summed cross-entropy over the vocab) and then a second, per-token
               cross-entropy over the same logits;
  trunk        embeddings + k blocks only; head_matmul: mlm.cls at the masked positions only;
  ce           one per-token cross-entropy over the (N, V) masked-position logits.
Data: uniform random token ids masked by pipeline.masking.mask_tokens (15%): speed only.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.nn import functional as F

import bench_common as bc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--n", type=int, default=64, help="candidates scored (m * oversample)")
    parser.add_argument("--exits", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="calls per arm per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    bc.set_threads(args.threads)
    from pipeline.model import build_model, sparse_mlm
    from pipeline.sift.scoring import exit_layer_losses, per_sample_loss

    cfg = bc.run_config(args.preset, args.n)
    torch.manual_seed(0)
    model = build_model(cfg.model, args.vocab, args.seq)
    mlm = model.mlm
    batch = bc.random_batch(args.n, args.seq, args.vocab, np.random.default_rng(0))
    ids, labels = batch["input_ids"], batch["labels"]
    masked = labels != -100
    print(f"{args.preset}, n {args.n}, seq {args.seq}, vocab {args.vocab}: {int(masked.sum())} masked positions, "
          f"{torch.get_num_threads()} threads")

    @torch.no_grad()
    def ce_twice(k: int) -> torch.Tensor:
        mlm.eval()
        hidden = mlm.bert.embeddings(input_ids=ids)
        for layer in mlm.bert.encoder.layer[:k]:
            hidden = layer(hidden)
        out = sparse_mlm(mlm.cls, hidden, labels)
        token_loss = F.cross_entropy(out.logits.float(), out.targets, reduction="none")
        mlm.train()
        return per_sample_loss(token_loss, out.sample_index, ids.shape[0])[0]

    @torch.no_grad()
    def trunk(k: int) -> torch.Tensor:
        hidden = mlm.bert.embeddings(input_ids=ids)
        for layer in mlm.bert.encoder.layer[:k]:
            hidden = layer(hidden)
        return hidden

    mlm.eval()
    with torch.no_grad():
        hidden0 = trunk(1)[masked]  # (N, H)
        logits = mlm.cls(hidden0)  # (N, V)
    mlm.train()

    def timer(fn) -> dict[str, float]:
        watch = bc.Stopwatch()
        for _ in range(args.calls):
            fn()
        return watch.per(args.calls)

    arms = {}
    for k in args.exits:
        assert torch.allclose(exit_layer_losses(model, ids, labels, k)[0], ce_twice(k)), "the two scorers disagree"
        arms[f"pipeline@{k}"] = lambda k=k: timer(lambda: exit_layer_losses(model, ids, labels, k))
        arms[f"ce_twice@{k}"] = lambda k=k: timer(lambda: ce_twice(k))
        arms[f"trunk@{k}"] = lambda k=k: timer(lambda: (mlm.eval(), trunk(k), mlm.train()))
    with torch.no_grad():
        arms["head_matmul"] = lambda: timer(lambda: (mlm.eval(), mlm.cls(hidden0), mlm.train()))
        arms["ce"] = lambda: timer(lambda: F.cross_entropy(logits, labels[masked], reduction="none"))
        print(bc.load_line("before"))
        env = bc.environment()
        records = bc.interleave(arms, rounds=args.rounds, warmup=1)
    env["load_avg_after"] = bc.load_line("after")
    print(env["load_avg_after"])
    print("\n| arm | wall s per call (median) | range | CPU s per call (median) | range |\n|---|---|---|---|---|")
    for name, recs in records.items():
        print(f"| {name} | {bc.median(recs, 'total'):.4f} | {bc.spread(recs, 'total')} | "
              f"{bc.median(recs, 'cpu'):.4f} | {bc.spread(recs, 'cpu')} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "env": env, "records": records}, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
