"""Golden runs: a fixed-seed tiny run per policy must repeat its per-step losses and kept samples.

The recorded values live in tests/golden/runs.json. They pin the training behaviour (data order,
masking, selection, forward/backward, optimizer) across refactors: a change that alters any loss
bit or any kept key fails here. Only an intended behaviour change may rewrite the file, with the
reason in the commit message:

    .venv/bin/python -m tests.test_golden --write

Checked to fail: swapping two kept samples in the sift policy, and changing the warmup by one step,
each made this test red (tried by hand when the file was first recorded).

Exact equality holds for one CPU kernel family; the file records `torch.backends.cpu.get_cpu_capability()`
and a machine with another one (other SIMD kernels sum in another order) compares the losses to
1e-5 relative instead, the kept keys still exactly.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden" / "runs.json"
ARMS = {  # name -> overrides on configs/tiny.yaml
    "vanilla": ["select.policy=vanilla"],
    "random": ["select.policy=random"],
    "sift@1": ["select.policy=sift", "select.exit_layer=1"],
    "exact": ["select.policy=exact"],
}
COMMON = ["train.max_steps=6", "train.grad_accum=2", "model.dropout=0.1", "train.record_keys=true",
          "train.export=false", "train.eval_every=3", "train.ckpt_every=0", "select.probe_every=0",
          "tracking.enabled=false"]


def golden_run(data_dir: Path, out_dir: Path, arm: str, dist_info) -> dict:
    """One arm's loss and kept keys per micro-step (train.record_keys) and its final eval loss."""
    from pipeline.train import train
    from tests.conftest import tiny_config

    cfg = tiny_config(data_dir, out_dir, *COMMON, *ARMS[arm])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count changes how CPU kernels sum: one, whatever the caller has
    try:
        last_eval = train(cfg, dist_info)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out_dir / "keys" / "rank00000.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records], "kept": [r["kept"] for r in records],
            "eval_loss": last_eval["eval/loss"]}


@pytest.mark.parametrize("arm", list(ARMS))
def test_golden_run_repeats_losses_and_kept_samples(tiny_data, tmp_path, dist_info, arm):
    golden = json.loads(GOLDEN.read_text())
    expected = golden["arms"][arm]
    got = golden_run(tiny_data, tmp_path, arm, dist_info)
    assert got["kept"] == expected["kept"], f"{arm}: other samples were kept"
    if golden["cpu_capability"] == torch.backends.cpu.get_cpu_capability():
        assert got["losses"] == expected["losses"], f"{arm}: per-step losses changed"
        assert got["eval_loss"] == expected["eval_loss"]
    else:
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5), arm
        assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)


def write_golden() -> None:
    import tempfile

    from pipeline.distributed import init_distributed
    from tests.conftest import write_corpus
    from data_prep.build import BuildOptions, build_shards

    info = init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus.txt")
        data = root / "shards"
        build_shards([str(corpus)], str(data), BuildOptions(seq_len=32, vocab_size=120, val_fraction=0.1, samples_per_shard=16))
        arms = {arm: golden_run(data, root / arm.replace("@", "_"), arm, info) for arm in ARMS}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                  "torch": torch.__version__, "arms": arms}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__" and "--write" in sys.argv:
    write_golden()
