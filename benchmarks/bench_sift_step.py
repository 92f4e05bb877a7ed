"""Step time of SIFT at several exit layers vs vanilla, beside a cost model (issue 4's benchmark).

    python benchmarks/bench_sift_step.py --preset mini --m 32 --exits 0 1 2 4 --threads 1   # ~3 min of CPU
    python benchmarks/bench_sift_step.py --preset base --m 8 --exits 1 --rounds 3 --steps 1 --reps 1 --threads 1

Every table is printed twice: by the wall clock and by this process's CPU time (the selector's
CPU time for the scoring column). On a shared machine run with --threads 1 and read the CPU clock.

One engine (built as pipeline.run.Run.open builds it, ds_configs/base.json) and
one pipeline.sift.hook.Selector per arm; every arm runs pipeline.step.train_step (bench_common.
PipelineStep): vanilla draws m candidates, sift@k draws m * oversample and keeps m. Arms run in one
process, interleaved round by round (the order rotates), median over rounds.

Cost model, calibrated each round from separately timed pieces on the same module:
  scoring(k) = emb(n) + k * block(n) + head(n)      n = m * oversample, no_grad, eval mode
      emb: mlm.bert.embeddings; block: one encoder layer; head: mlm.cls at the masked positions
      plus one per-token cross-entropy (the least any exit-layer scorer must do)
  train      = fwd(m) + bwd(m) + opt                through the engine: engine(...),
      engine.backward, engine.step (bwd / fwd is printed: the textbook value is ~2)
  model(k)   = scoring(k) + train; model(vanilla) = train.
Goal (issue 4): measured / model <= 1.10 for every arm; on `base` at exit 1, scoring <= 15% of
the training step.

Data: uniform random token ids masked by pipeline.masking.mask_tokens (15%): speed only.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import bench_common as bc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", help="configs/<preset>.yaml model (dropout included)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--m", type=int, default=32, help="micro-batch: samples backpropagated per step")
    parser.add_argument("--oversample", type=int, default=2)
    parser.add_argument("--exits", type=int, nargs="+", default=[0, 1, 2, 4], help="exit layers (L = exact)")
    parser.add_argument("--vocab", type=int, default=30522, help="BERT-base's vocab size by default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm per round")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each calibration piece per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every round's timings here")
    args = parser.parse_args()
    bc.set_threads(args.threads)
    info = bc.init_single_process()
    from pipeline.sift.hook import Selector

    vanilla_cfg = bc.run_config(args.preset, args.m, "select.policy=vanilla")
    engine, _ = bc.build_engine(vanilla_cfg, args.vocab, args.seq)
    mlm = engine.module.mlm
    L = engine.module.num_layers
    if any(not 0 <= k <= L for k in args.exits):
        parser.error(f"--exits must be in 0..{L} for preset {args.preset}")
    n = args.m * args.oversample
    rng = np.random.default_rng(0)

    steps: dict[str, bc.PipelineStep] = {}
    pools: dict[str, list[dict]] = {}
    for k in [None, *args.exits]:
        name = "vanilla" if k is None else f"sift@{k}"
        extra = ["select.policy=vanilla"] if k is None else \
            ["select.policy=sift", f"select.exit_layer={k}", f"select.oversample={args.oversample}"]
        cfg = bc.run_config(args.preset, args.m, *extra, "select.probe_every=0")
        selector = Selector.for_run(cfg, vocab_size=args.vocab, mask_id=bc.MASK)
        steps[name] = bc.PipelineStep(engine, selector, cfg, info)
        pools[name] = [bc.random_batch(args.m if k is None else n, args.seq, args.vocab, rng, key=f"{name}-{i}-")
                       for i in range(3)]

    def arm(name: str):
        def run() -> dict[str, float]:
            scoring, select_cpu, watch = 0.0, 0.0, bc.Stopwatch()
            for i in range(args.steps):
                scoring += steps[name](pools[name][i % len(pools[name])])
                select_cpu += steps[name].select_cpu_s
            return {**watch.per(args.steps), "scoring": scoring / args.steps, "scoring_cpu": select_cpu / args.steps}
        return run

    score_batch = bc.random_batch(n, args.seq, args.vocab, rng, key="piece-")
    train_batch = bc.random_batch(args.m, args.seq, args.vocab, rng, key="train-")

    def pieces() -> dict[str, float]:
        return bc.calibrate_pieces(engine, score_batch, train_batch, args.reps)

    print(f"{args.preset}: {L} layers, hidden {mlm.config.hidden_size}, vocab {args.vocab}, seq {args.seq}, "
          f"m {args.m}, oversample {args.oversample} ({n} candidates), {torch.get_num_threads()} threads")
    print(bc.load_line("before"))
    env = bc.environment()
    arms = {"pieces": pieces, **{name: arm(name) for name in steps}}
    records = bc.interleave(arms, rounds=args.rounds, warmup=1)
    env["load_avg_after"] = bc.load_line("after")
    print(env["load_avg_after"])
    for clock in ("wall", "cpu"):
        report(records, args, L, n, clock)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "env": env, "records": records}, handle, indent=1, default=str)


def report(records: dict, args: argparse.Namespace, L: int, n: int, clock: str) -> None:
    def med(name: str, key: str) -> float:
        return bc.median(records[name], bc.clock_key(key, clock))

    p = {key: med("pieces", key) for key in ("emb", "block", "head", "fwd", "bwd", "opt")}
    _, train = bc.modelled_step(p, None)
    print(f"\n{clock} clock, pieces (median s): emb({n}) {p['emb']:.4f}, block({n}) {p['block']:.4f}, "
          f"head({n}) {p['head']:.4f}; fwd({args.m}) {p['fwd']:.4f}, bwd({args.m}) {p['bwd']:.4f} "
          f"(bwd/fwd {p['bwd'] / p['fwd']:.2f}), opt {p['opt']:.4f}; modelled train step {train:.4f}")
    print(f"head share of modelled exit-1 scoring: {p['head'] / (p['emb'] + p['block'] + p['head']):.0%}\n")
    vanilla = med("vanilla", "total")
    print("| arm | step s (median) | range | model s | measured / model | scoring s (median) | scoring model s | "
          "scoring / step | scoring / vanilla step | step / vanilla |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, recs in records.items():
        if name == "pieces":
            continue
        k = None if name == "vanilla" else int(name.split("@")[1])
        score_model, _ = bc.modelled_step(p, k)
        step, scoring = med(name, "total"), med(name, "scoring")
        label = f"{name} (exact)" if k == L else name
        print(f"| {label} | {step:.3f} | {bc.spread(recs, bc.clock_key('total', clock))} | {score_model + train:.3f} | "
              f"{step / (score_model + train):.3f} | {scoring:.3f} | {score_model:.3f} | {scoring / step:.1%} | "
              f"{scoring / vanilla:.1%} | {step / vanilla:.3f} |")

if __name__ == "__main__":
    main()
