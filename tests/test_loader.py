"""The training loader at GPU speed, its guarantees kept: each sample decoded once per epoch whatever
the number of loader workers, a resume that skips the consumed micro-batches without decoding them,
one DataLoader (and one set of workers) for the whole run, pinned memory and an asynchronous copy on
CUDA, and the same batches in the same order for any worker count, from any resume point and across
epoch boundaries. The decode counts run in this process: a fake worker split stands in for workers."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.data import CandidateBatches, DataFaults, micro_steps_per_epoch, train_loader
from pipeline.manifest import Manifest
from pipeline.progress import Progress
from tests.conftest import tiny_config
from tests.fault_helpers import build_small_data
from tests.test_faults_data import damaged, spec_of

BATCH = 8


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return build_small_data(tmp_path_factory.mktemp("loader"))


def candidates(manifest: Manifest, *, start: int = 0, epoch: int = 0, **options) -> CandidateBatches:
    return CandidateBatches(manifest, spec_of(manifest), batch=BATCH, epoch=epoch, seed=0, rank=0, world=1,
                            start=start, shuffle_buffer=16, strict=False, verify=False, **options)


def as_rows(batches) -> list[tuple]:
    """What training sees of each batch: its keys and masked inputs and labels."""
    return [(batch["keys"], batch["input_ids"].tolist(), batch["labels"].tolist()) for batch in batches]


def count_decodes(monkeypatch) -> list[str]:
    """The key of every sample decoded from now on (decode_sample wherever the loader imported it)."""
    from pipeline.data import decode_sample

    keys: list[str] = []

    def counting(sample: dict, *args):
        keys.append(sample["__key__"])
        return decode_sample(sample, *args)

    for name, module in list(sys.modules.items()):
        if (name == "pipeline.data" or name.startswith("pipeline.data.")) and hasattr(module, "decode_sample"):
            monkeypatch.setattr(module, "decode_sample", counting)
    return keys


def as_worker(monkeypatch, worker: int, workers: int) -> None:
    """This process plays loader worker `worker` of `workers` (what get_worker_info says in one)."""
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))


def test_two_workers_decode_each_sample_once_per_epoch(small, monkeypatch):
    """Each worker decodes only the samples of the batches it serves. Seen failing before the change:
    each of the 2 workers decoded the rank's whole stream (2 x 120 decodes for 120 samples served)."""
    manifest = Manifest.load(str(small))
    unbroken = as_rows(candidates(manifest))
    decoded = count_decodes(monkeypatch)
    served = []
    for worker in (0, 1):
        as_worker(monkeypatch, worker, 2)
        served.append(as_rows(candidates(manifest)))
    assert len(decoded) == len(unbroken) * BATCH
    assert sorted(decoded) == sorted(key for keys, _, _ in unbroken for key in keys)
    assert served[0] == unbroken[0::2] and served[1] == unbroken[1::2]  # the DataLoader's round-robin


def test_a_resume_skips_consumed_batches_without_decoding_them(small, monkeypatch):
    """The consumed batches are read (the shuffle buffer needs them) but not decoded. Seen failing
    before the change: a resume at micro-batch 5 decoded the 40 consumed samples too (120, not 80)."""
    manifest = Manifest.load(str(small))
    unbroken = as_rows(candidates(manifest))
    decoded = count_decodes(monkeypatch)
    resumed = as_rows(candidates(manifest, start=5))
    assert resumed == unbroken[5:]
    assert len(decoded) == BATCH * len(resumed)


@pytest.mark.parametrize("start", [0, 5])
def test_any_worker_count_gives_the_same_batches_from_any_resume_point(small, start):
    """data.num_workers is a safe key to change on resume. Seen failing before the change, at start 5
    with 2 workers: worker 0 served first, so the batches came 6, 5, 8, 7, ..."""
    manifest = Manifest.load(str(small))
    unbroken = as_rows(candidates(manifest))
    for workers in (1, 2):
        loader, _ = train_loader(manifest, spec_of(manifest), batch=BATCH, epoch=0, seed=0, rank=0, world=1,
                                 start=start, shuffle_buffer=16, strict=False, num_workers=workers, verify=False)
        got = [{k: v for k, v in batch.items() if k != "faults"} for batch in loader]
        assert as_rows(got) == unbroken[start:], f"{workers} workers"


def test_one_dataloader_serves_the_run_across_epoch_boundaries(small, tmp_path, monkeypatch):
    """Run._candidate_batches builds one DataLoader, whose workers run epoch after epoch; the order
    is still the single-process one and the progress counters follow the batches. Seen failing
    before the change: a new DataLoader (and new worker processes) per epoch, 2 for 2 epochs."""
    from pipeline.config import candidates_per_micro_step
    from pipeline.run import Run

    manifest = Manifest.load(str(small))
    cfg = tiny_config(small, tmp_path, "data.num_workers=2", "data.shuffle_buffer=16", "data.verify=false")
    batch = candidates_per_micro_step(cfg)
    steps = [micro_steps_per_epoch(manifest, epoch, cfg.train.seed, 1, batch) for epoch in (0, 1)]
    expected = []
    for epoch in (0, 1):
        expected += as_rows(CandidateBatches(manifest, spec_of(manifest), batch=batch, epoch=epoch,
                                             seed=cfg.train.seed, rank=0, world=1, start=0, shuffle_buffer=16,
                                             strict=False, verify=False))
    built = []

    class CountingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs) -> None:
            built.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    run = SimpleNamespace(cfg=cfg, manifest=manifest, spec=spec_of(manifest), progress=Progress(),
                          faults=DataFaults(), info=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    stream = Run._candidate_batches(run)
    try:
        got = [next(stream) for _ in range(steps[0] + 3)]
    finally:
        stream.close()
    assert built == [2]
    assert as_rows(got) == expected[:steps[0] + 3]
    assert (run.progress.epoch, run.progress.micro_in_epoch) == (1, 3)


@pytest.mark.parametrize("device,pinned", [("cuda", True), ("cpu", False)])
def test_batches_are_pinned_for_a_cuda_device_only(small, device, pinned):
    """Pinned batches let the copy to the GPU run asynchronously; a CPU run is left as it was.
    Seen failing before the change: there was no such argument (nor pin_memory)."""
    from pipeline.data import loader_kwargs

    assert loader_kwargs(device, num_workers=2, seed=0, epoch=0)["pin_memory"] is pinned
    manifest = Manifest.load(str(small))
    loader, _ = train_loader(manifest, spec_of(manifest), batch=BATCH, epoch=0, seed=0, rank=0, world=1, start=0,
                             shuffle_buffer=16, strict=False, num_workers=0, verify=False, device_type=device)
    assert loader.pin_memory is pinned


def test_to_device_copies_without_blocking(monkeypatch):
    """The host-to-GPU copy overlaps the next batch's preparation (a no-op on CPU). Seen failing
    before the change: .to(device) blocked."""
    from pipeline.step import to_device

    calls = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    moved = to_device({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, 3), "keys": ["a", "b"]},
                      torch.device("cpu"))
    assert calls == [True, True] and moved["keys"] == ["a", "b"]


def test_an_undecodable_sample_is_replaced_in_its_batch_alike_for_any_worker_count(small, tmp_path):
    """A sample that does not decode is counted and its place taken by a repeat of its batch's first
    decodable sample, a rule each worker applies alone: the batches and counts are the same with 0
    and 2 workers. (Held before the change as well, when every worker decoded everything.)"""
    data, _ = damaged(small, tmp_path / "d", "garbage payload")
    manifest = Manifest.load(str(data))
    results = []
    for workers in (0, 2):
        loader, dataset = train_loader(manifest, spec_of(manifest), batch=BATCH, epoch=0, seed=0, rank=0, world=1,
                                       start=0, shuffle_buffer=16, strict=False, num_workers=workers, verify=False)
        faults = DataFaults()
        batches = as_rows(faults.update(batch) for batch in loader)
        results.append((batches, faults.skipped, faults.repeated))
    assert results[0] == results[1]
    batches, skipped, repeated = results[0]
    assert len(batches) == dataset.steps and all(len(keys) == BATCH for keys, _, _ in batches)
    assert skipped == 1 and repeated == sum(len(keys) - len(set(keys)) for keys, _, _ in batches) <= 1


def npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=True)
    return buffer.getvalue()


PAYLOADS = {"uint16": npy(np.arange(64, dtype=np.uint16)), "big-endian int32": npy(np.arange(64, dtype=">i4")),
            "version 2 header": npy(np.arange(64, dtype=np.uint16), (2, 0)), "float32": npy(np.ones(64, np.float32)),
            "2-D": npy(np.zeros((2, 32), np.uint16)), "trailing bytes": npy(np.arange(64, dtype=np.uint16)) + b"xx",
            "cut short": npy(np.arange(64, dtype=np.uint16))[:-10], "a pickle": npy(np.array([{}], dtype=object)),
            "no .npy": b"\x93NUMPY\x01\x00" + b"\xff" * 40, "empty": b""}


@pytest.mark.parametrize("name", PAYLOADS)
def test_the_npy_fast_path_gives_what_np_load_gives(name, monkeypatch):
    """The same array (dtype, shape, values, writable) or the same exception type as np.load, the second
    time through a header seen before too."""
    from pipeline.data import shards

    monkeypatch.setattr(shards, "_NPY_LAYOUTS", {})
    shards.load_npy(PAYLOADS["uint16"])  # a header seen before, for "cut short" and "trailing bytes"
    payload = PAYLOADS[name]
    for _ in range(2):
        try:
            expected = np.load(io.BytesIO(payload), allow_pickle=False)
        except Exception as err:
            with pytest.raises(type(err)):
                shards.load_npy(payload)
            continue
        got = shards.load_npy(payload)
        assert (got.dtype, got.shape, got.flags.writeable) == (expected.dtype, expected.shape, True)
        assert np.array_equal(got, expected)


def test_a_npy_header_is_parsed_once_not_per_sample(small, monkeypatch):
    """np.load (whose header parsing is most of a sample's decode time) runs once per header. Seen
    failing before the change: it ran once per sample, 16 times for a shard of 16."""
    from pipeline.data import SkipCounter, shard_stream, shards

    monkeypatch.setattr(shards, "_NPY_LAYOUTS", {}, raising=False)
    calls = []
    load = np.load
    monkeypatch.setattr(np, "load", lambda *args, **kwargs: calls.append(1) or load(*args, **kwargs))
    url = str(small / "train-000000.tar")
    assert len(list(shard_stream([url], 32, 10_000, SkipCounter(strict=True)))) == 16
    assert len(calls) == 1
