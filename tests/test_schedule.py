"""The learning-rate schedule by steps or by training time, and when selection starts: by a fraction of
the budget or by regime (select.start_at_mask_accuracy)."""
from __future__ import annotations

import json
import math

import pytest

from pipeline.config import load_config
from pipeline.schedule import budget_fraction, lr_at, uses_time
from tests.conftest import tiny_config
from tests.fault_helpers import journal


def train_cfg(*overrides: str):
    return load_config(None, ["train.lr=1.0", "train.min_lr_ratio=0.1", *overrides]).train


def test_step_schedule_warms_up_then_decays_by_cosine_to_the_floor():
    t = train_cfg("train.warmup_steps=10", "train.max_steps=110")
    assert not uses_time(t)
    assert lr_at(0, 0.0, t) == pytest.approx(0.1) and lr_at(9, 0.0, t) == pytest.approx(1.0)
    assert lr_at(60, 0.0, t) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_at(110, 0.0, t) == pytest.approx(0.1) and lr_at(500, 0.0, t) == pytest.approx(0.1)
    assert lr_at(60, 999.0, t) == lr_at(60, 0.0, t)  # training time plays no part


@pytest.mark.parametrize("shape,half", [("linear", 0.5), ("cosine", 0.5)])
def test_time_schedule_spreads_warmup_and_decay_over_max_seconds(shape, half):
    t = train_cfg("train.max_seconds=100", "train.warmup_fraction=0.1", f"train.lr_decay={shape}",
                  "train.max_steps=100000")
    assert uses_time(t)  # auto: a time budget means the time schedule
    assert lr_at(0, 0.0, t) == 0.0 and lr_at(5, 5.0, t) == pytest.approx(0.5)
    assert lr_at(7, 10.0, t) == pytest.approx(1.0)
    assert lr_at(9, 55.0, t) == pytest.approx(0.1 + 0.9 * half)  # half way through the decay
    assert lr_at(9, 100.0, t) == pytest.approx(0.1) and lr_at(9, 250.0, t) == pytest.approx(0.1)
    assert lr_at(50_000, 55.0, t) == lr_at(3, 55.0, t)  # steps play no part
    quarter = lr_at(9, 10.0 + 0.25 * 90.0, t)
    assert quarter == pytest.approx(0.1 + 0.9 * (0.75 if shape == "linear" else 0.5 * (1 + math.cos(math.pi / 4))))


def test_budget_fraction_follows_the_schedule():
    assert budget_fraction(50, 30.0, train_cfg("train.max_steps=200")) == 0.25
    assert budget_fraction(50, 30.0, train_cfg("train.max_seconds=60")) == 0.5
    assert budget_fraction(50, 30.0, train_cfg("train.max_seconds=60", "train.schedule=steps",
                                                "train.max_steps=100")) == 0.5
    assert budget_fraction(50, 90.0, train_cfg("train.max_seconds=60")) == 1.0


def test_time_schedule_resumes_from_the_saved_training_time(tiny_data, tmp_path, dist_info):
    """The LR after a resume continues from the checkpointed training time. Checked to fail with
    Progress.train_time_s reset to 0 on resume (the LR fell back to the start of the warmup)."""
    from pipeline.train import train

    run = ["train.schedule=time", "train.max_seconds=1000", "train.warmup_fraction=0.5", "train.ckpt_every=4",
           "train.export=false", "train.eval_every=100"]
    train(tiny_config(tiny_data, tmp_path, *run, "train.max_steps=4"), dist_info)
    before = journal(tmp_path, "train/lr")
    train(tiny_config(tiny_data, tmp_path, *run, "train.max_steps=6"), dist_info)
    after = journal(tmp_path, "train/lr")
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert 0 < before[4][0] < after[5][0] < after[6][0]  # still warming up, never back to 0


def test_selection_starts_when_the_regime_is_reached_and_stays_on_after_a_resume(tiny_data, tmp_path, dist_info):
    """select.start_at_mask_accuracy: the policy trains the first m candidates until an eval reaches
    the threshold, then selects; the start survives a resume. Checked to fail with the selector's
    started_at_step left out of its checkpointed state (step 5 went back to the first m)."""
    from pipeline.train import train

    run = ["select.policy=sift", "select.start_at_mask_accuracy=0.000001", "train.eval_every=3",
           "train.ckpt_every=4", "train.record_keys=true", "train.export=false"]
    train(tiny_config(tiny_data, tmp_path, *run, "train.max_steps=4"), dist_info)
    train(tiny_config(tiny_data, tmp_path, *run, "train.max_steps=6"), dist_info)
    active = {step: values[-1] for step, values in journal(tmp_path, "select/active").items()}
    assert active == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 1.0, 6: 1.0}
    records = [json.loads(line) for line in (tmp_path / "keys" / "rank00000.jsonl").open()]
    first_m = [r["kept"] == r["candidates"][:8] for r in records]
    assert first_m[:3] == [True] * 3 and not all(first_m[3:])
    tags = json.loads((tmp_path / "tracking_events.jsonl").read_text().splitlines()[-1])
    events = [json.loads(line) for line in (tmp_path / "tracking_events.jsonl").open()]
    assert any(e.get("kind") == "tags" and e["data"].get("select.started_at_step") == "3" for e in events), tags


def test_selection_never_starts_below_the_regime(tiny_data, tmp_path, dist_info):
    from pipeline.train import train

    train(tiny_config(tiny_data, tmp_path, "select.policy=sift", "select.start_at_mask_accuracy=0.99",
                      "train.max_steps=4", "train.eval_every=2", "train.export=false"), dist_info)
    assert {values[-1] for values in journal(tmp_path, "select/active").values()} == {0.0}


def test_every_run_logs_its_context_free_reference_once(tiny_data, tmp_path, dist_info):
    """eval/mask_accuracy_ref and eval/unigram_ce, computed here by hand from the shards."""
    import numpy as np

    from pipeline.data import eval_batches
    from pipeline.manifest import Manifest
    from pipeline.masking import eval_mask_spec
    from pipeline.train import train
    from tests.fault_helpers import tar_samples

    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=2", "train.export=false")
    train(cfg, dist_info)
    manifest = Manifest.load(str(tiny_data))
    counts = np.zeros(manifest.vocab_size)
    for shard in sorted(tiny_data.glob("train-*.tar")):
        for _, ids in tar_samples(shard):
            counts += np.bincount(ids.astype(np.int64), minlength=manifest.vocab_size)
    counts[list(manifest.special_ids.values())] = 0
    hits, ce, n = 0, 0.0, 0
    for batch in eval_batches(manifest, eval_mask_spec(cfg.data, manifest), samples=cfg.data.eval_samples, batch=8,
                              rank=0, world=1):
        at_mask = batch["input_ids"] == manifest.special_ids["mask"]
        targets = batch["labels"][at_mask].numpy()
        hits += int((targets == counts.argmax()).sum())
        ce += float(-np.log((counts[targets] + 1) / (counts.sum() + counts.size)).sum())
        n += targets.size
    assert journal(tmp_path, "eval/mask_accuracy_ref") == {0: [pytest.approx(hits / n)]}
    assert journal(tmp_path, "eval/unigram_ce") == {0: [pytest.approx(ce / n)]}
