"""The DeepSpeed engine's overhead on CPU, and the sparse vs the dense MLM head (issue 3's benchmark).

    python benchmarks/bench_engine_overhead.py --part overhead --threads 1   # ~1.5 min of CPU
    python benchmarks/bench_engine_overhead.py --part head --threads 1       # ~2.5 min of CPU

Every table is printed twice: by the wall clock and by this process's CPU time. On a machine that
others share, run with --threads 1 and read the CPU clock (docs/BENCHMARKS.md says why).

Part `overhead`: samples/s of three arms on the same model, batch and initial weights, in one
process, interleaved round by round (the order rotates), median over rounds:
  plain     a plain PyTorch loop: model(ids, labels).loss.backward(), clip_grad_norm_, AdamW.step,
            zero_grad (torch.optim.AdamW with the DeepSpeed JSON's betas/eps and the run's lr/wd);
  engine    deepspeed.initialize as pipeline.run.Run.open does it (ds_configs/base.json): engine(...), engine.backward, engine.step;
  pipeline  pipeline.step.train_step, the training step itself (vanilla policy): lr set, selector, forward, finite
            check, engine.backward, the plain grad norm, engine.step, loss.item().
Goal (issue 3): pipeline / plain >= 0.95.

Part `head`: forward+backward time of the MLM head (BERT's transform + decoder over the vocab) at
the masked positions only (pipeline.model.sparse_mlm) vs at every position with the loss taken on
the masked ones (the dense head), at a BERT-base vocab, at the mini and the base hidden sizes.

Data: uniform random token ids masked by pipeline.masking.mask_tokens (15%): speed only, no learning.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch import nn

import bench_common as bc


def overhead(args: argparse.Namespace) -> dict:
    info = bc.init_single_process()
    from pipeline.config import candidates_per_micro_step
    from pipeline.model import build_model
    from pipeline.sift.hook import Selector

    cfg = bc.run_config(args.preset, args.m, "select.policy=vanilla")
    assert candidates_per_micro_step(cfg) == args.m
    batch = bc.random_batch(args.m, args.seq, args.vocab, np.random.default_rng(0))
    ids, labels = batch["input_ids"], batch["labels"]

    engine, ds_config = bc.build_engine(cfg, args.vocab, args.seq)
    torch.manual_seed(cfg.train.seed * 1000)  # the same initial weights as the engine's model
    plain = build_model(cfg.model, args.vocab, args.seq).train()
    opt_params = ds_config["optimizer"]["params"]
    optimizer = torch.optim.AdamW(plain.parameters(), lr=cfg.train.lr, betas=tuple(opt_params["betas"]),
                                  eps=opt_params["eps"], weight_decay=cfg.train.weight_decay)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), engine.module.state_dict().values()))
    print(f"engine optimizer: {type(engine.optimizer).__name__}, module training={engine.module.training}")
    selector = Selector.for_run(cfg, vocab_size=args.vocab, mask_id=bc.MASK)
    pipeline_step = bc.PipelineStep(engine, selector, cfg, info)

    def plain_arm() -> dict[str, float]:
        ph = bc.Phases()
        for _ in range(args.steps):
            ph.restart()
            out = plain(ids, labels)
            ph.mark("forward")
            out.loss.backward()
            ph.mark("backward")
            nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.loss.item()
            ph.mark("step")
        return ph.per(args.steps)

    def engine_arm() -> dict[str, float]:
        ph = bc.Phases()
        for _ in range(args.steps):
            ph.restart()
            out = engine(ids, labels)
            ph.mark("forward")
            engine.backward(out.loss)
            ph.mark("backward")
            engine.step()
            out.loss.item()
            ph.mark("step")
        return ph.per(args.steps)

    def pipeline_arm() -> dict[str, float]:
        watch = bc.Stopwatch()
        for _ in range(args.steps):
            pipeline_step(batch)
        return watch.per(args.steps)

    print(bc.load_line("before"))
    env = bc.environment()
    records = bc.interleave({"plain": plain_arm, "engine": engine_arm, "pipeline": pipeline_arm},
                            rounds=args.rounds, warmup=1)
    env["load_avg_after"] = bc.load_line("after")
    print(env["load_avg_after"])
    result = {"part": "overhead", "args": vars(args), "env": env, "records": records}
    for clock in ("wall", "cpu"):
        report_overhead(records, args, clock)
    return result


def report_overhead(records: dict, args: argparse.Namespace, clock: str) -> None:
    total = bc.clock_key("total", clock)
    plain_s = bc.median(records["plain"], total)
    print(f"\n{clock} clock: {args.preset}, seq {args.seq}, m {args.m}, vocab {args.vocab}, {args.rounds} rounds x "
          f"{args.steps} steps, {torch.get_num_threads()} threads\n")
    print("| arm | s/step (median) | range over rounds | samples/s | ratio to plain | forward | backward | step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, recs in records.items():
        s = bc.median(recs, total)
        phases = [f"{bc.median(recs, bc.clock_key(k, clock)):.3f}" if k in recs[0] else "-"
                  for k in ("forward", "backward", "step")]
        print(f"| {name} | {s:.3f} | {bc.spread(recs, total)} | {args.m / s:.1f} | {plain_s / s:.3f} | "
              + " | ".join(phases) + " |")
    ratios = [p[total] / q[total] for p, q in zip(records["plain"], records["pipeline"])]
    print(f"\n{clock} clock, pipeline / plain samples/s per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {float(np.median(ratios)):.3f} (goal >= 0.95)")


def head(args: argparse.Namespace) -> dict:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    from pipeline.masking import IGNORE_INDEX
    from pipeline.model import sparse_mlm

    batch = bc.random_batch(args.m, args.seq, args.vocab, np.random.default_rng(1))
    labels = batch["labels"]
    print(f"masked positions: {int((labels != IGNORE_INDEX).sum())} of {labels.numel()}")
    print(bc.load_line("before"))
    env = bc.environment()
    results = {}
    for hidden_size in args.hidden:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=args.vocab, hidden_size=hidden_size, num_attention_heads=max(1, hidden_size // 64),
                            intermediate_size=4 * hidden_size)
        mlm_head = BertOnlyMLMHead(config)
        hidden = torch.randn(args.m, args.seq, hidden_size, requires_grad=True)  # (B, T, H)

        def run(loss_fn) -> dict[str, float]:
            watch = bc.Stopwatch()
            for _ in range(args.steps):
                loss_fn().backward()
                mlm_head.zero_grad(set_to_none=True)
                hidden.grad = None
            return watch.per(args.steps)

        def sparse() -> torch.Tensor:
            return sparse_mlm(mlm_head, hidden, labels).loss

        def dense() -> torch.Tensor:
            logits = mlm_head(hidden)  # (B, T, V)
            return nn.functional.cross_entropy(logits.view(-1, args.vocab), labels.view(-1), ignore_index=IGNORE_INDEX)

        assert torch.allclose(sparse(), dense(), rtol=1e-4), "the two heads disagree on the loss"
        records = bc.interleave({"sparse": lambda: run(sparse), "dense": lambda: run(dense)}, rounds=args.rounds)
        results[hidden_size] = records
    env["load_avg_after"] = bc.load_line("after")
    print(env["load_avg_after"])
    for clock in ("wall", "cpu"):
        key = bc.clock_key("total", clock)
        print(f"\n{clock} clock: MLM head forward+backward, batch {args.m} x seq {args.seq}, vocab {args.vocab}, "
              f"{args.rounds} rounds x {args.steps} calls, {torch.get_num_threads()} threads\n")
        print("| hidden | sparse s (median, range) | dense s (median, range) | dense / sparse |")
        print("|---|---|---|---|")
        for hidden_size, records in results.items():
            s, d = bc.median(records["sparse"], key), bc.median(records["dense"], key)
            print(f"| {hidden_size} | {s:.3f} ({bc.spread(records['sparse'], key)}) | "
                  f"{d:.3f} ({bc.spread(records['dense'], key)}) | {d / s:.2f} |")
    return {"part": "head", "args": vars(args), "env": env, "records": {str(k): v for k, v in results.items()}}


def _per_step(times: dict[str, float], steps: int) -> dict[str, float]:
    return {k: v / steps for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("overhead", "head"), required=True)
    parser.add_argument("--preset", default="mini", help="overhead: model preset (configs/<preset>.yaml)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--m", type=int, default=32, help="micro-batch (samples per step)")
    parser.add_argument("--vocab", type=int, default=30522, help="BERT-base's vocab size by default")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 768], help="head: hidden sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (calls) per arm per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every round's timings here")
    args = parser.parse_args()
    bc.set_threads(args.threads)
    result = overhead(args) if args.part == "overhead" else head(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
