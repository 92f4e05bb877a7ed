"""The FLOP count of pipeline/flops.py: against hand counts, against the real modules (so the count
follows the model if a preset or transformers changes), and the throughput metrics a run logs.

Checked to fail: counting the MLP as 2*h*i for modernbert made the module test red for modernbert
(its gated Wi is h x 2i); dropping the attention term made both hand counts red.
"""
from __future__ import annotations

import pytest
from torch import nn

from pipeline import flops
from pipeline.config import load_config
from pipeline.manifest import Manifest
from tests.conftest import REPO, tiny_config
from tests.fault_helpers import journal

# tiny (L 2, h 32, i 64) on the tests' data (V 120, T 32), M = 5 masked positions:
#   P = 4*32*32 + 2*32*64 = 4,096 + 4,096 = 8,192
#   H = 32*32 + 32*120 = 1,024 + 3,840 = 4,864
#   per token and layer, forward: 2*P + 4*T*h = 16,384 + 4,096 = 20,480
#   fwd(2) = 2*32*20,480 + 5*2*4,864 = 1,310,720 + 48,640 = 1,359,360;  train = 3 * fwd = 4,078,080
#   score(1) = 1*32*20,480 + 48,640 = 704,000
TINY = {"P": 8_192, "H": 4_864, "fwd": 1_359_360, "train": 4_078_080, "score1": 704_000}
# base (L 12, h 768, i 3072) at BERT's V 30,522 and T 128, M = 0.15 * 128 = 19.2:
#   P = 4*768*768 + 2*768*3072 = 2,359,296 + 4,718,592 = 7,077,888
#   H = 768*768 + 768*30,522 = 589,824 + 23,440,896 = 24,030,720
#   per token and layer, forward: 2*P + 4*128*768 = 14,155,776 + 393,216 = 14,548,992
#   fwd(12) = 12*128*14,548,992 + 19.2*2*24,030,720 = 22,347,251,712 + 922,779,648 = 23,270,031,360
#   train = 69,810,094,080 (~69.8 GFLOP a sample);  score(1) = 128*14,548,992 + 922,779,648 = 2,785,050,624
BASE = {"P": 7_077_888, "H": 24_030_720, "fwd": 23_270_031_360, "train": 69_810_094_080, "score1": 2_785_050_624}
# modernbert base: the gated MLP adds h*i per layer: P = 7,077,888 + 2,359,296 = 9,437,184


def test_tiny_matches_the_hand_count():
    s = flops.Shape("bert", 2, 32, 64, 120, 32)
    assert flops.block_params("bert", 32, 64) == TINY["P"] and flops.head_params(32, 120) == TINY["H"]
    assert flops.forward_flops(s, 2, 5) == TINY["fwd"]
    assert flops.train_flops(s, 5) == TINY["train"]
    assert flops.scoring_flops(s, 1, 5) == TINY["score1"]


def test_base_matches_the_hand_count():
    cfg = load_config(str(REPO / "configs" / "base.yaml"))
    s = flops.shape_of(cfg, 30522, 128)
    assert s == flops.Shape("bert", 12, 768, 3072, 30522, 128)
    masked = flops.expected_masked(cfg.data.mask_prob, 128)
    assert masked == pytest.approx(19.2)
    assert flops.block_params("bert", 768, 3072) == BASE["P"] and flops.head_params(768, 30522) == BASE["H"]
    assert flops.forward_flops(s, 12, masked) == pytest.approx(BASE["fwd"], rel=1e-12)
    assert flops.train_flops(s, masked) == pytest.approx(BASE["train"], rel=1e-12)
    assert flops.scoring_flops(s, 1, masked) == pytest.approx(BASE["score1"], rel=1e-12)
    assert flops.block_params("modernbert", 768, 3072) == 9_437_184


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("arch,preset,extra", [
    ("bert", "tiny", []), ("bert", "base", []), ("bert", "tiny", ["model.intermediate_size=48"]),
    ("bert", "tiny", ["model.positions=rotary", "model.pre_layernorm=true", "train.export=false"]),
    ("modernbert", "tiny", []), ("modernbert", "base", []),
])
def test_the_count_follows_the_real_modules(arch, preset, extra):
    """Each block's nn.Linear weights are P, the head's are H: what flops.py multiplies by."""
    from pipeline.model import build_model

    cfg = load_config(None, [f"model.arch={arch}", f"model.preset={preset}", *extra])
    vocab, seq = 1000, 64
    model = build_model(cfg.model, vocab, seq)
    layers, hidden, _, inner = cfg.model.shape
    if arch == "bert":
        blocks, head = model.mlm.bert.encoder.layer, model.mlm.cls
    else:
        blocks, head = model.mlm.model.layers, nn.ModuleList([model.mlm.head, model.mlm.decoder])
    assert len(blocks) == layers
    assert all(linear_weights(block) == flops.block_params(arch, hidden, inner) for block in blocks)
    assert linear_weights(head) == flops.head_params(hidden, vocab)


def test_peak_by_device_name():
    assert flops.peak_for_device("NVIDIA H100 80GB HBM3") == 989
    assert flops.peak_for_device("NVIDIA H100 PCIe") == 756  # the longer name wins
    assert flops.peak_for_device("NVIDIA H200") == 989 and flops.peak_for_device("NVIDIA A100-SXM4-80GB") == 312
    assert flops.peak_for_device("cpu") is None and flops.resolve_peak(0.0, "cpu") is None
    assert flops.resolve_peak(123.0, "NVIDIA H100 80GB HBM3") == 123.0  # train.peak_tflops wins


def test_step_work_of_each_policy():
    def work(*overrides):
        cfg = load_config(str(REPO / "configs" / "tiny.yaml"), ["train.grad_accum=2", *overrides])
        return flops.step_work(cfg, 2, 120, 32, None)

    vanilla, sift = work("select.policy=vanilla"), work("select.policy=sift", "select.oversample=3")
    assert (vanilla.samples_backprop, vanilla.samples_seen, vanilla.samples_scored) == (32, 32, 0)
    assert (sift.samples_backprop, sift.samples_seen, sift.samples_scored) == (32, 96, 96)
    s = flops.Shape("bert", 2, 32, 64, 120, 32)
    assert sift.scoring_flops_per_sample == flops.scoring_flops(s, 1, 0.15 * 32)
    assert work("select.policy=exact").scoring_flops_per_sample == flops.forward_flops(s, 2, 0.15 * 32)
    assert work("select.policy=random").samples_scored == 0
    assert work("select.policy=sift_mask").scoring_flops_per_sample == flops.scoring_flops(s, 1, 0.8 * 0.15 * 32)
    # two steps, one selecting: training twice, scoring once
    assert sift.flops(1, 2) == 2 * 32 * sift.train_flops_per_sample + 96 * sift.scoring_flops_per_sample


def test_a_run_logs_throughput_consistent_with_the_formula_and_step_time(tiny_data, tmp_path, dist_info):
    from pipeline.train import train

    peak = 0.002  # TFLOP/s: a made-up peak, so that the CPU run logs MFU
    cfg = tiny_config(tiny_data, tmp_path, "select.policy=sift", "train.max_steps=3", "train.export=false",
                      "select.probe_every=0", f"train.peak_tflops={peak}")
    train(cfg, dist_info)
    logged = {key: journal(tmp_path, key) for key in (
        "time/step_s", "throughput/samples_per_s", "throughput/tokens_per_s", "throughput/seen_samples_per_s",
        "throughput/seen_tokens_per_s", "throughput/tflops", "throughput/mfu", "throughput/mfu_backprop")}
    vocab = Manifest.load(str(tiny_data)).vocab_size
    s, masked = flops.Shape("bert", 2, 32, 64, vocab, 32), 0.15 * 32
    train_per_step = 8 * flops.train_flops(s, masked)  # m = 8 backpropagated, one rank, log_every 1
    all_per_step = train_per_step + 16 * flops.scoring_flops(s, 1, masked)  # 16 candidates scored
    for step in (1, 2, 3):
        step_s = logged["time/step_s"][step][-1]
        got = {key: values[step][-1] for key, values in logged.items()}
        assert got["throughput/samples_per_s"] == pytest.approx(8 / step_s, rel=1e-9)
        assert got["throughput/tokens_per_s"] == pytest.approx(8 * 32 / step_s, rel=1e-9)
        assert got["throughput/seen_samples_per_s"] == pytest.approx(16 / step_s, rel=1e-9)
        assert got["throughput/seen_tokens_per_s"] == pytest.approx(16 * 32 / step_s, rel=1e-9)
        assert got["throughput/tflops"] == pytest.approx(all_per_step / step_s / 1e12, rel=1e-9)
        assert got["throughput/mfu"] == pytest.approx(all_per_step / step_s / 1e12 / peak, rel=1e-9)
        assert got["throughput/mfu_backprop"] == pytest.approx(train_per_step / step_s / 1e12 / peak, rel=1e-9)
