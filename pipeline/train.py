"""Pretrain BERT-MLM on DeepSpeed, backpropagating only the samples the selection policy keeps.

    python -m pipeline.train --config configs/mini.yaml --set select.policy=sift --set select.exit_layer=1
    deepspeed --num_gpus 8 --module pipeline.train --config configs/base.yaml
    torchrun --nproc_per_node 2 -m pipeline.train --config configs/tiny.yaml

Per optimizer step and rank: grad_accum micro-steps, each drawing m * oversample candidates,
keeping m (pipeline/sift/) and running forward, engine.backward and engine.step on those m
(pipeline/step.py). Everything the loop uses is built and checked once by pipeline/run.py.
"""
from __future__ import annotations

import logging
import sys

from pipeline.signals import StopFlag

log = logging.getLogger("pipeline.train")


def train(cfg, info, stop: StopFlag | None = None) -> dict[str, float]:
    """The whole run; returns the last eval metrics. Resumes from out_dir's newest checkpoint."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pipeline.config import candidates_per_micro_step
    from pipeline.distributed import all_reduce_max
    from pipeline.progress import ProgressBar
    from pipeline.run import Run
    from pipeline.step import train_step

    stop = stop or StopFlag()
    last_eval: dict[str, float] = {}
    with Run.open(cfg, info) as run:
        stop.install()  # again: a library may have taken the signals while the run was built
        t, p, world = cfg.train, run.progress, info.world_size
        m, candidates = t.micro_batch, candidates_per_micro_step(cfg)
        log.info("per optimizer step: %d ranks x %d micro-steps x %d kept of %d candidates = %d samples "
                 "backpropagated, %d seen (%d tokens each)", world, t.grad_accum, m, candidates,
                 m * t.grad_accum * world, candidates * t.grad_accum * world, run.manifest.seq_len)
        already_done = run.complete()
        reason = f"the run was already complete ({already_done}): nothing trained" if already_done else ""
        window, signalled = [], 0.0
        with ProgressBar(p, t.max_steps, t.max_seconds, info.is_main) as bar, logging_redirect_tqdm():
            while not reason:
                probe = cfg.select.probe_every > 0 and p.step % cfg.select.probe_every == 0
                window.append(train_step(run.engine, run.selector, run.batches, p, info, t, probe=probe,
                                         on_micro_step=run.record_keys if t.record_keys else None,
                                         capacity_prob=run.capacity_prob))
                p.wall_clock_s = run.clock()

                # clocks differ per rank: all take the slowest one's time and the same decisions (ZeRO-3
                # evals and scoring are collectives; the time schedule sets the LR)
                p.train_time_s, signalled = all_reduce_max([p.train_time_s, float(stop.requested)], info)
                out_of_time = 0 < t.max_seconds <= p.train_time_s
                last = p.step == t.max_steps
                stopping = bool(signalled) or out_of_time or last
                if p.step % t.log_every == 0 or stopping:
                    run.log_window(window)
                    bar.update(p, window[-1].loss, window[-1].lr)
                    window = []
                eval_time_due = 0 < t.eval_every_s <= p.train_time_s - p.last_eval_train_s
                if p.step % t.eval_every == 0 or stopping or eval_time_due:
                    last_eval = run.evaluate()
                    run.start_selection_if_due(last_eval)  # select.start_at_mask_accuracy
                    stopping = stopping or run.target_reached()
                if stopping or (t.ckpt_every and p.step % t.ckpt_every == 0):
                    run.save()
                if stopping:
                    reason = (f"a signal; this step's checkpoint is written, --resume {t.out_dir} continues"
                              if signalled else run.complete())
                    log.info("stopping at step %d: %s", p.step, "signal" if signalled else reason)
        if signalled:
            run.close("KILLED")  # preempted: the requeued job resumes this MLflow run
        elif already_done:
            run.close("FINISHED")
        else:
            run.finish()  # the export, then FINISHED
        if info.is_main:
            print(run.summary(reason, last_eval), flush=True)
    return last_eval


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import run_cli

    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
