"""Truncated, corrupt and changed shards. With data.verify (the default) a shard whose sha256 is not
the manifest's is left out whole, counted (data/skipped_shards) and named, or refused with
data.strict=true; without it (remote shards are never hashed) broken samples are skipped and counted
(data/skipped_corrupt), a rank whose stream comes up short repeats it (data/repeated_samples), and
data.strict=true fails naming the shard."""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline.masking import MaskSpec
from pipeline.data import (CandidateBatches, CorruptSampleError, DataFaults, SkipCounter, shard_stream,
                           train_loader)
from pipeline.manifest import DataError, Manifest
from tests.conftest import tiny_config
from tests.fault_helpers import build_small_data, copy_data, journal

MEMBER = 1024  # one seq_len-32 uint16 sample in a tar: a 512-byte header, the .npy padded to 512


def truncate(path: Path, keep: int) -> None:
    """Cut the shard inside the data of sample `keep` (a copy cut short, a disk that filled up)."""
    path.write_bytes(path.read_bytes()[:keep * MEMBER + 700])


def garble_header(path: Path, sample: int) -> None:
    data = bytearray(path.read_bytes())
    data[sample * MEMBER:sample * MEMBER + 512] = random.Random(sample).randbytes(512)
    path.write_bytes(bytes(data))


def garble_payload(path: Path, sample: int) -> None:
    data = bytearray(path.read_bytes())
    data[sample * MEMBER + 512:sample * MEMBER + 528] = b"\x00" * 16  # the .npy magic and header start
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": (truncate, 6, 10), "garbage header": (garble_header, 3, 13),
          "garbage payload": (garble_payload, 5, 1)}  # name: (how, where, samples lost of 16)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    data = build_small_data(tmp_path_factory.mktemp("small"))
    first = (data / "train-000000.tar").read_bytes()
    assert first[512:518] == b"\x93NUMPY" and first[MEMBER + 512:MEMBER + 518] == b"\x93NUMPY"  # the layout above
    return data


def damaged(small: Path, dst: Path, *kinds: str) -> tuple[Path, dict[str, str]]:
    """A copy of `small` with train shards 1, 3, 5, ... damaged as named; returns {kind: shard path}."""
    data = copy_data(small, dst)
    where = {}
    for index, kind in zip((1, 3, 5), kinds):
        how, arg, _ = DAMAGE[kind]
        path = data / f"train-{index:06d}.tar"
        how(path, arg)
        where[kind] = str(path)
    return data, where


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_shard_loses_only_its_broken_samples_and_counts_them(small, tmp_path, kind):
    data, where = damaged(small, tmp_path / "d", kind)
    url, lost = where[kind], DAMAGE[kind][2]
    handler = SkipCounter(strict=False)
    samples = list(shard_stream([url], 32, 10_000, handler, expected={url: 16}))
    assert (len(samples), handler.skipped) == (16 - lost, lost)
    with pytest.raises(CorruptSampleError, match=f"data.strict=true.*\\({url}\\)"):
        list(shard_stream([url], 32, 10_000, SkipCounter(strict=True), expected={url: 16}))


def spec_of(manifest: Manifest) -> MaskSpec:
    return MaskSpec(0.15, manifest.vocab_size, manifest.special_ids["mask"], tuple(sorted(manifest.special_ids.values())))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_short_stream_is_repeated_counted_and_logged_with_any_worker_count(small, tmp_path, caplog, workers):
    data, _ = damaged(small, tmp_path / "d", "truncated")
    manifest = Manifest.load(str(data))
    loader, dataset = train_loader(manifest, spec_of(manifest), batch=8, epoch=0, seed=0, rank=0, world=1, start=0,
                                   shuffle_buffer=16, strict=False, num_workers=workers, verify=False)
    faults = DataFaults()
    with caplog.at_level("WARNING", logger="pipeline.data"):
        batches = [faults.update(batch) for batch in loader]
    assert len(batches) == dataset.steps == manifest.split_samples("train") // 8
    readable = manifest.split_samples("train") - 10
    assert (faults.skipped, faults.repeated) == (10, dataset.steps * 8 - readable)
    if workers == 0:
        assert "stream short by" in caplog.text and "repeating it" in caplog.text
        assert "readable samples, the manifest says 16" in caplog.text


def test_fault_counts_are_not_counted_twice_after_a_resume(small, tmp_path):
    data, _ = damaged(small, tmp_path / "d", "truncated", "garbage header")
    manifest = Manifest.load(str(data))

    def batches(start: int):
        return iter(CandidateBatches(manifest, spec_of(manifest), batch=8, epoch=0, seed=0, rank=0, world=1,
                                     start=start, shuffle_buffer=16, strict=False, verify=False))

    straight = DataFaults()
    total = sum(1 for batch in batches(0) if straight.update(batch))
    first = DataFaults()
    for _, batch in zip(range(5), batches(0)):
        first.update(batch)
    resumed = DataFaults(**asdict(first))  # as saved in the rank's checkpoint state
    assert sum(1 for batch in batches(5) if resumed.update(batch)) == total - 5
    listed = manifest.split_samples("train")
    assert (resumed.skipped, resumed.repeated) == (straight.skipped, straight.repeated) == (23, 8 * total - (listed - 23))


def test_training_skips_corrupt_samples_and_mlflow_gets_the_counts(small, tmp_path, dist_info, caplog):
    from mlflow.tracking import MlflowClient

    from pipeline.train import train

    data, where = damaged(small, tmp_path / "d", *DAMAGE)
    out = tmp_path / "run"
    cfg = tiny_config(data, out, "train.max_steps=15", "train.ckpt_every=5", "train.eval_every=5", "train.export=false",
                      "data.verify=false")
    listed = Manifest.load(str(data)).split_samples("train")
    assert listed // 8 == 15  # max_steps is one epoch
    with caplog.at_level("WARNING"):
        train(cfg, dist_info)
    assert sorted(journal(out, "train/loss")) == list(range(1, 16))  # training went on
    for path in where.values():
        assert path in caplog.text  # each damaged shard is named in a warning
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    skipped = {m.step: m.value for m in client.get_metric_history(run_id, "data/skipped_corrupt")}
    repeated = {m.step: m.value for m in client.get_metric_history(run_id, "data/repeated_samples")}
    assert sorted(skipped) == sorted(repeated) == [5, 10, 15]  # logged at every checkpoint
    assert skipped[15] == 10 + 13 + 1 and repeated[15] == 15 * 8 - (listed - 24)


def test_strict_mode_fails_naming_the_shard(small, tmp_path, dist_info, monkeypatch):
    import deepspeed

    from pipeline.run import Run
    from pipeline.train import train

    data, where = damaged(small, tmp_path / "d", "truncated")  # a size unlike the manifest's: found at start
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: pytest.fail("deepspeed.initialize was reached"))
    cfg = tiny_config(data, tmp_path / "r1", "data.strict=true")
    with pytest.raises(DataError, match=f"a shard is damaged: .* bytes, the manifest says .*\\({where['truncated']}\\): .*data.strict=false"):
        Run.open(cfg, dist_info)
    monkeypatch.undo()

    data, where = damaged(small, tmp_path / "d2", "truncated", "garbage header")  # a header garbled mid-shard
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["shards"]:  # the manifest agrees on sizes: only reading finds the damage
        shard["bytes"] = (data / shard["name"]).stat().st_size
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_config(data, tmp_path / "r2", "data.strict=true", "train.max_steps=15", "train.export=false",
                      "data.verify=false")
    with pytest.raises(CorruptSampleError, match=r"data\.strict=true.*\(.*train-00000[13]\.tar\)"):
        train(cfg, dist_info)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where,offset", [("in a sample's token ids (it still decodes)", 5 * MEMBER + 700),
                                          ("in a sample's .npy header", 5 * MEMBER + 520)])
def test_a_flipped_byte_leaves_its_shard_out_counted_and_named(small, tmp_path, dist_info, caplog, where, offset):
    """data.verify: the shard's sha256 no longer matches, so it is left out whole, counted in
    data/skipped_shards and named; training goes on. Checked to fail with data.verify=false: the
    token-id flip trained silently and the header flip cost one sample with no word of the shard."""
    from pipeline.train import train

    data = copy_data(small, tmp_path / "d")
    shard = data / "train-000003.tar"
    flip_byte(shard, offset)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="pipeline.data"):
        train(tiny_config(data, out, "train.max_steps=4", "train.ckpt_every=4", "train.export=false"), dist_info)
    assert f"skipping shard {shard}: its sha256 is not the manifest's" in caplog.text
    assert journal(out, "data/skipped_shards") == {4: [1.0]}
    assert journal(out, "data/skipped_corrupt") == {4: [0.0]}


def test_a_changed_shard_is_refused_naming_it_with_strict(small, tmp_path, capsys):
    """data.strict=true: exit 2 and one line that names the shard (through the real CLI)."""
    import subprocess
    import sys

    from tests.conftest import REPO, clean_env
    from tests.fault_helpers import train_cmd

    data = copy_data(small, tmp_path / "d")
    flip_byte(data / "train-000002.tar", 3 * MEMBER + 700)
    result = subprocess.run(train_cmd(data, tmp_path / "run", "data.strict=true", "train.max_steps=4"), cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sha256 ") and f"({data / 'train-000002.tar'})" in last


def test_mask_shares_choose_what_the_masked_tokens_become():
    """80/10/10 by default; with all of them [MASK] the input keeps no answer to copy."""
    import numpy as np

    from pipeline.masking import mask_tokens

    ids = np.arange(10, 4010)
    specs = {"bert": MaskSpec(0.5, 5000, 4, (0, 1, 2, 3, 4)),
             "all_mask": MaskSpec(0.5, 5000, 4, (0, 1, 2, 3, 4), mask_share=1.0, random_share=0.0)}
    shares = {}
    for name, spec in specs.items():
        inputs, labels = mask_tokens(ids, np.random.default_rng(0), spec)
        chosen = labels >= 0
        shares[name] = [float((inputs[chosen] == 4).mean()), float((inputs[chosen] == ids[chosen]).mean())]
    assert abs(shares["bert"][0] - 0.8) < 0.03 and abs(shares["bert"][1] - 0.1) < 0.03
    assert shares["all_mask"] == [1.0, 0.0]
