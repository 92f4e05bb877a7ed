"""Pretrain BERT-MLM on DeepSpeed, backpropagating only the samples the selection policy keeps.

    python -m pipeline.train --config configs/mini.yaml --set select.policy=sift --set select.exit_layer=1
    deepspeed --num_gpus 8 --module pipeline.train --config configs/base.yaml
    torchrun --nproc_per_node 2 -m pipeline.train --config configs/tiny.yaml

Per optimizer step and rank: grad_accum micro-steps, each drawing m * oversample candidates,
keeping m (pipeline/selector.py) and running forward, engine.backward and engine.step on those m.
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time

import torch
from tqdm import tqdm

from pipeline.config import Config, ConfigError, candidates_per_micro_step, load_config
from pipeline.distributed import DistInfo, all_reduce_flags, init_distributed, shutdown
from pipeline.manifest import DataError
from pipeline.run_setup import Progress, RunParts, build_run, check_finite, lr_at

log = logging.getLogger("pipeline.train")


def train(cfg: Config, info: DistInfo, stop: StopFlag | None = None) -> dict[str, float]:
    """The whole run; returns the last eval metrics. Resumes from out_dir's newest checkpoint."""
    stop = stop or StopFlag()
    run: RunParts = build_run(cfg, info)
    stop.install()  # again: a library may have taken the signals while the run was built
    try:
        return _train(run, stop)
    except BaseException:
        run.tracker.close(status="FAILED")  # the MLflow run shows the crash; the journal keeps every metric
        raise


def _train(run: RunParts, stop: StopFlag) -> dict[str, float]:
    cfg, info = run.cfg, run.info
    engine, selector, progress, tracker = run.engine, run.selector, run.progress, run.tracker
    t = cfg.train
    m, candidates, world = t.micro_batch, candidates_per_micro_step(cfg), info.world_size
    log.info("per optimizer step: %d ranks x %d micro-steps x %d kept of %d candidates = %d samples "
             "backpropagated, %d seen (%d tokens each)", world, t.grad_accum, m, candidates,
             m * t.grad_accum * world, candidates * t.grad_accum * world, run.manifest.seq_len)
    bar = tqdm(total=t.max_steps, initial=progress.step, disable=not info.is_main, unit="step", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 60.0)  # a line a minute in batch logs
    started = time.perf_counter() - progress.wall_clock_s
    last_eval: dict[str, float] = {}
    window: list[dict[str, float]] = []

    while progress.step < t.max_steps:
        step_start = time.perf_counter()
        lr = lr_at(progress.step, t)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        probe_due = cfg.select.probe_every > 0 and progress.step % cfg.select.probe_every == 0
        probe, probe_s = {}, 0.0
        losses, scoring_s, kept_loss, dropped_loss, kept_ce, pool_ce = [], 0.0, [], [], [], []
        while len(losses) < t.grad_accum:
            batch = next(run.batches)  # (m * oversample, T) candidates
            if probe_due and not probe:  # a diagnostic: its time is not training time
                probe_start = time.perf_counter()
                probe = selector.probe(engine.module.mlm, batch)
                probe_s += time.perf_counter() - probe_start
            kept, stats = selector.select(engine.module.mlm, batch, progress.step)  # (m, T)
            progress.samples_seen += candidates * world
            out = engine(kept["input_ids"].to(info.device), kept["labels"].to(info.device))
            if not check_finite(out.loss, info, progress, t.max_nonfinite_in_a_row):
                continue  # every rank skips this micro-step together; counted in progress
            engine.backward(out.loss)
            plain_norm = _plain_grad_norm(engine)  # DeepSpeed reports no norm at ZeRO-0 fp32
            engine.step()
            progress.samples_backprop += m * world
            losses.append(out.loss.item())
            run.record_keys(progress.step, batch["keys"], kept["keys"], losses[-1])
            scoring_s += stats.scoring_s
            kept_loss.append(stats.kept_loss), dropped_loss.append(stats.dropped_loss)
            kept_ce.append(stats.kept_unigram_ce), pool_ce.append(stats.pool_unigram_ce)
        progress.step += 1
        step_s = time.perf_counter() - step_start - probe_s
        progress.train_time_s += step_s
        progress.wall_clock_s = time.perf_counter() - started
        bar.update(1)
        window.append({"train/loss": sum(losses) / len(losses), "train/lr": lr,
                       "train/grad_norm": _grad_norm(engine, plain_norm), "time/step_s": step_s, "time/scoring_s": scoring_s,
                       "select/scoring_share": scoring_s / step_s, "select/kept_loss": _mean(kept_loss),
                       "select/dropped_loss": _mean(dropped_loss), "select/kept_unigram_ce": _mean(kept_ce),
                       "select/pool_unigram_ce": _mean(pool_ce), **probe})

        out_of_time = 0 < t.max_seconds <= progress.train_time_s
        eval_time_due = 0 < t.eval_every_s <= progress.train_time_s - progress.last_eval_train_s
        # clocks differ per rank: every rank follows the same decision (ZeRO-3 evals are collectives)
        stopping, eval_time_due = all_reduce_flags([stop.requested or out_of_time, eval_time_due], info)
        if progress.step % t.log_every == 0 or progress.step == t.max_steps or stopping:
            tracker.log_metrics(_window_metrics(window, progress, m * world, run.manifest.seq_len), progress.step)
            bar.set_postfix(loss=f"{window[-1]['train/loss']:.3f}", lr=f"{lr:.2e}")
            window = []
        reached = False
        if progress.step % t.eval_every == 0 or progress.step == t.max_steps or stopping or eval_time_due:
            last_eval = _evaluate_and_log(run, started)
            reached = 0 < t.target_accuracy <= last_eval["eval/accuracy"]
            stopping = stopping or reached
        if stopping or progress.step == t.max_steps or (t.ckpt_every and progress.step % t.ckpt_every == 0):
            progress.wall_clock_s = time.perf_counter() - started
            run.save_checkpoint()
        if stopping:
            log.info("stopping at step %d: %s", progress.step, "signal" if stop.requested else
                     "target accuracy reached" if reached else "time budget spent")
            break
    bar.close()
    if stop.requested:
        tracker.close(status="KILLED")  # preempted: the requeued job resumes this MLflow run
        return last_eval
    if not last_eval:  # resumed at max_steps: nothing trained, still report the model
        last_eval = _evaluate_and_log(run, started)
    run.finish()
    return last_eval


def _evaluate_and_log(run: RunParts, started: float) -> dict[str, float]:
    """Eval metrics plus the progress counters at this point, so curves need no join."""
    p = run.progress
    p.last_eval_train_s = p.train_time_s
    metrics = run.evaluate()
    run.tracker.log_metrics({**metrics, "eval/train_time_s": p.train_time_s,
                             "eval/samples_backpropagated": p.samples_backprop, "eval/samples_seen": p.samples_seen,
                             "eval/wall_clock_s": time.perf_counter() - started}, p.step)
    log.info("step %d: eval loss %.4f accuracy %.4f (at [MASK]: %.4f)", p.step, metrics["eval/loss"],
             metrics["eval/accuracy"], metrics["eval/mask_accuracy"])
    return metrics


def _window_metrics(window: list[dict[str, float]], progress: Progress, batch: int, seq_len: int
                    ) -> dict[str, float]:
    keys = dict.fromkeys(key for w in window for key in w)  # probe/* is in one step's entry, not the last
    metrics = {key: _mean([w[key] for w in window if key in w]) for key in keys}
    step_s = metrics["time/step_s"]
    metrics.update({"train/samples_per_s": batch / step_s, "train/tokens_per_s": batch * seq_len / step_s,
                    "progress/samples_seen": progress.samples_seen,
                    "progress/samples_backpropagated": progress.samples_backprop,
                    "progress/train_time_s": progress.train_time_s, "progress/wall_clock_s": progress.wall_clock_s,
                    "train/nonfinite_skipped": progress.nonfinite_skipped})
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _plain_grad_norm(engine) -> float | None:
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    if not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


def _grad_norm(engine, plain_norm: float | None) -> float:
    norm = engine.get_global_grad_norm()
    norm = plain_norm if norm is None else norm
    return float(norm) if norm is not None else math.nan


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm preemption) ask the loop to checkpoint and exit at the next step.

    main() creates it first thing: a signal that comes while the run starts up (imports, rendezvous,
    loading a checkpoint) is remembered, not lost, and not fatal (USR1 would kill by default)."""

    def __init__(self) -> None:
        self.requested = False
        self.install()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum: int, _frame) -> None:
        log.warning("received signal %d: checkpointing and stopping after this step", signum)
        self.requested = True


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set train.lr=5e-4 --set select.policy=sift")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)  # every config error surfaces before any compute
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = init_distributed()
    setup_logging(info.rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        train(cfg, info, stop)
    except (ConfigError, DataError) as err:  # bad input, found before any training step
        log.error("%s", err)
        shutdown(barrier=False)
        return 2
    # No barrier after a failure (an exception propagates from here): the other ranks may be
    # healthy and inside a collective, and a barrier would hang this rank without its traceback.
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
