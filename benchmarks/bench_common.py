"""Shared pieces of the speed benchmarks: environment record, random MLM batches, the engine built as
pipeline.run.Run.open builds it, the training step itself (pipeline.step.train_step), and an
interleaved A B A B ... timing loop so that machine drift hits every arm alike.

Not a library module: imported by the scripts in this folder (run them from the repository root).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.distributed import prepare_environment

REPO = Path(__file__).resolve().parent.parent
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # special ids of the random-token data


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs)"


def environment() -> dict[str, Any]:
    import deepspeed
    import transformers

    return {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}


def load_line(tag: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {tag}: {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min)"


def mask_spec(vocab: int, mask_prob: float = 0.15):
    from pipeline.masking import MaskSpec

    return MaskSpec(mask_prob, vocab, MASK, (PAD, UNK, CLS, SEP, MASK))


def random_batch(n: int, seq: int, vocab: int, rng: np.random.Generator, key: str = "b") -> dict:
    """n packed rows of uniform random token ids ([CLS] ... [SEP]), masked by pipeline.masking.mask_tokens
    (15% of the non-special tokens: 80% [MASK], 10% random, 10% kept)."""
    from pipeline.masking import mask_tokens

    spec = mask_spec(vocab)
    ids = rng.integers(MASK + 1, vocab, size=(n, seq))
    ids[:, 0], ids[:, -1] = CLS, SEP
    inputs, labels = zip(*(mask_tokens(row, rng, spec) for row in ids))
    return {"keys": [f"{key}{i:05d}" for i in range(n)], "input_ids": torch.from_numpy(np.stack(inputs)),
            "labels": torch.from_numpy(np.stack(labels))}


def run_config(preset: str, micro_batch: int, *overrides: str):
    """configs/<preset>.yaml for the model (dropout included), on the CPU DeepSpeed JSONs, one micro-step."""
    from pipeline.config import load_config

    path = REPO / "configs" / f"{preset}.yaml"
    base = [f"model.preset={preset}", "model.arch=bert", "model.positions=learned", f"train.micro_batch={micro_batch}",
            "train.grad_accum=1",
            "train.ds_configs=[ds_configs/base.json]", "tracking.enabled=false"]
    return load_config(str(path) if path.is_file() else None, base + list(overrides))


def init_single_process():
    """One rank of one, gloo, DS_ACCELERATOR=cpu: what `python -m pipeline.train` does."""
    prepare_environment()
    from pipeline.distributed import init_distributed

    return init_distributed()


def build_engine(cfg, vocab: int, seq: int):
    """The model and engine exactly as pipeline.run.Run.open makes them (rank 0 of 1)."""
    import deepspeed

    from pipeline.ds_config import build_ds_config
    from pipeline.model import build_model

    ds_config = build_ds_config(cfg, 1, "cpu")
    torch.manual_seed(cfg.train.seed * 1000)
    model = build_model(cfg.model, vocab, seq)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine, ds_config


class PipelineStep:
    """pipeline.step.train_step, the training step itself, on one given candidate batch (grad_accum 1)."""

    def __init__(self, engine, selector, cfg, info) -> None:
        from pipeline.progress import Progress

        self.engine, self.selector, self.cfg, self.info = engine, selector, cfg, info
        self.progress = Progress()
        self.select_cpu_s = 0.0  # CPU seconds of the last step's scoring and selection

    def __call__(self, batch: dict) -> float:
        """Runs the step; returns the selector's scoring seconds."""
        from pipeline.step import train_step

        metrics = train_step(self.engine, self.selector, iter([batch]), self.progress, self.info, self.cfg.train)
        self.select_cpu_s = metrics.scoring_cpu_s
        return metrics.scoring_s


class Stopwatch:
    """Wall-clock and this process's CPU seconds (all its threads) since start, per unit of work.

    Under a loaded machine the wall clock also counts the time other processes held our cores; the
    CPU clock does not, and with one thread (no spinning partner thread) it measures the work alone."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        lap = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return lap

    def per(self, units: int) -> dict[str, float]:
        wall, cpu = self.lap()
        return {"total": wall / units, "cpu": cpu / units}


class Phases:
    """Accumulates wall and CPU seconds per named phase of a loop; `total`/`cpu` are their sums.
    `sync` (torch.cuda.synchronize on a GPU) runs before each clock reading: kernels are asynchronous,
    and without it a phase would be charged for the kernels queued before it."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.watch = Stopwatch()
        self.acc: dict[str, list[float]] = {}

    def restart(self) -> None:
        self.sync()
        self.watch.lap()

    def mark(self, name: str) -> None:
        self.sync()
        wall, cpu = self.watch.lap()
        acc = self.acc.setdefault(name, [0.0, 0.0])
        acc[0] += wall
        acc[1] += cpu

    def per(self, units: int) -> dict[str, float]:
        out = {}
        for name, (wall, cpu) in self.acc.items():
            out[name], out[f"{name}_cpu"] = wall / units, cpu / units
        out["total"] = sum(wall for wall, _ in self.acc.values()) / units
        out["cpu"] = sum(cpu for _, cpu in self.acc.values()) / units
        return out


def calibrate_pieces(engine, score_batch: dict, train_batch: dict, reps: int,
                     sync: Callable[[], None] | None = None) -> dict[str, float]:
    """The cost model's pieces timed on the engine's own BERT module, per repetition (wall and CPU):
    emb, block (one encoder layer) and head (mlm.cls at the masked positions plus one per-token
    cross-entropy) on the scoring batch, no_grad in eval mode; fwd, bwd and opt of one training step
    on the train batch through the engine. Scoring at exit k is modelled as emb + k * block + head."""
    from torch.nn import functional as F

    mlm, ph = engine.module.mlm, Phases(sync)
    ids, labels = score_batch["input_ids"], score_batch["labels"]
    masked = labels != -100
    for _ in range(reps):
        mlm.eval()
        with torch.no_grad():
            ph.restart()
            hidden = mlm.bert.embeddings(input_ids=ids)  # (n, T, H)
            ph.mark("emb")
            after = mlm.bert.encoder.layer[0](hidden)
            ph.mark("block")
            F.cross_entropy(mlm.cls(after[masked]).float(), labels[masked], reduction="none")  # (N,)
            ph.mark("head")
        mlm.train()
        ph.restart()
        out = engine(train_batch["input_ids"], train_batch["labels"])
        ph.mark("fwd")
        engine.backward(out.loss)
        ph.mark("bwd")
        engine.step()
        ph.mark("opt")
    return ph.per(reps)


def modelled_step(pieces: dict[str, float], exit_layer: int | None, clock: str = "wall") -> tuple[float, float]:
    """(scoring, training) seconds of one step by the cost model; scoring 0 for exit_layer None (vanilla)."""
    p = {key: pieces[clock_key(key, clock)] for key in ("emb", "block", "head", "fwd", "bwd", "opt")}
    scoring = 0.0 if exit_layer is None else p["emb"] + exit_layer * p["block"] + p["head"]
    return scoring, p["fwd"] + p["bwd"] + p["opt"]


def clock_key(key: str, clock: str) -> str:
    """'total' -> 'cpu' and 'forward' -> 'forward_cpu' under the CPU clock."""
    if clock == "wall":
        return key
    return "cpu" if key == "total" else f"{key}_cpu"


def interleave(arms: dict[str, Callable[[], dict[str, float]]], rounds: int, warmup: int = 1,
               log: Callable[[str], None] = print) -> dict[str, list[dict[str, float]]]:
    """Each arm is a callable doing one timed unit of work and returning named seconds. After `warmup`
    untimed calls per arm, runs `rounds` rounds of one call per arm, the order rotating by one each
    round (A B C, B C A, ...), all in this process. Returns every round's record per arm."""
    names = list(arms)
    for name in names:
        for _ in range(warmup):
            arms[name]()
    records: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            records[name].append(arms[name]())
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {records[n][-1].get('total', 0.0):.3f}s wall "
                                                   f"{records[n][-1].get('cpu', 0.0):.3f}s cpu" for n in names))
    return records


def median(records: list[dict[str, float]], key: str) -> float:
    return statistics.median(rec[key] for rec in records)


def spread(records: list[dict[str, float]], key: str) -> str:
    values = [rec[key] for rec in records]
    return f"{min(values):.3f}-{max(values):.3f}"
