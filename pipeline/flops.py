"""FLOPs of this model family, written out from the config, and the peak throughput of known GPUs.

Counted: the matrix multiplies, 2 FLOPs per multiply-add (as nanoGPT, PaLM and Chinchilla count).
Not counted: biases, LayerNorms, GELU/GLU gates, softmax, dropout, rotary, the cross-entropy and the
optimizer (O(hidden) per token or O(params) per step: under 1% at BERT-base), and the embedding lookup
(0: a gather, no matmul). Names: L layers, h hidden, i intermediate, V vocab, T seq_len, k exit
layer, M masked positions per sample (the MLM head runs only there: pipeline/model.py's sparse head).

    block matmul weights, one layer (the nn.Linear weights of the transformers modules):
      bert        P = 4*h*h + 2*h*i     query, key, value, attention output (h x h each); MLP h x i, i x h
      modernbert  P = 4*h*h + 3*h*i     Wqkv (h x 3h), Wo (h x h); gated MLP Wi (h x 2i), Wo (i x h)
    head matmul weights, per masked token:
      H = h*h + h*V                     transform dense (h x h) and decoder (h x V), both arches
    forward, per token and layer:
      2*P                               the block's matmuls
      2*2*T*h                           attention: QK^T (T dot products of length h, over all heads)
                                        and AV (T weighted sums of width h)
    forward, one sample through the first n blocks:
      fwd(n, M) = n * T * (2*P + 4*T*h) + M * 2*H
    training = 3 x forward (backward = 2 x forward: gradients for the inputs and for the weights)
      train(M)  = 3 * fwd(L, M) = 6*L*T*P + 12*L*T*T*h + 6*M*H
    SIFT's scoring, one candidate, no gradients (embeddings, blocks 1..k, the head at its masked positions):
      score(k, M) = fwd(k, M)           exact / selective_backprop score at k = L
    M defaults to the expected count mask_prob * T (the loader masks only non-special tokens, so this
    is a slight overcount); sift_mask scores only the [MASK] inputs: M' = mask_share * mask_prob * T.
    With static shapes (train.static_shapes, on by default on CUDA) the head runs at a fixed
    pipeline.masking.head_capacity of positions, ~10% more than M at BERT-base's batch: that padding
    is hardware work, not model work, and is not counted (MFU counts the model's FLOPs).

    per optimizer step, all ranks (A = grad_accum, W = world size, m = micro_batch, C = m * oversample):
      train(M) * m*A*W  +  score(k, M') * C*A*W  (the second term only on steps that select)

BERT-base (L 12, h 768, i 3072, V 30522, T 128, M 19.2): P = 7,077,888, H = 24,030,720,
fwd = 23.27 GFLOP and train = 69.81 GFLOP per sample; score(1) = 2.79 GFLOP per candidate.
tests/test_flops.py holds the hand counts and checks P and H against the real modules.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ARCHES, Config, candidates_per_micro_step, exit_layer_run

# Dense BF16 tensor-core peak, TFLOP/s per GPU (NVIDIA datasheets; their headline figures are with 2:4
# sparsity, twice these). Matched by substring of torch.cuda.get_device_name(), the longest name first.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,  # datasheet 1,513 with sparsity
    "H100": 989.0,  # SXM5: 1,979 with sparsity
    "H200": 989.0,  # the H100's GH100 die with more memory: 1,979 with sparsity
    "A100": 312.0,  # 624 with sparsity
}


@dataclass(frozen=True)
class Shape:
    """What the FLOP count reads of a model: its sizes and the data's."""
    arch: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    seq_len: int


def shape_of(cfg: Config, vocab: int, seq_len: int) -> Shape:
    layers, hidden, _, inner = cfg.model.shape
    return Shape(cfg.model.arch, layers, hidden, inner, vocab, seq_len)


def block_params(arch: str, hidden: int, intermediate: int) -> int:
    """P: the matmul weights of one transformer block (attention 4*h*h, MLP 2*h*i, or 3*h*i gated)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}")
    mlp = 3 if arch == "modernbert" else 2
    return 4 * hidden * hidden + mlp * hidden * intermediate


def head_params(hidden: int, vocab: int) -> int:
    """H: the MLM head's matmul weights (transform h x h, decoder h x V), applied per masked token."""
    return hidden * hidden + hidden * vocab


def attention_flops(seq_len: int, hidden: int) -> int:
    """Forward FLOPs of QK^T and AV, per token and layer: 2*2*T*h."""
    return 2 * 2 * seq_len * hidden


def expected_masked(mask_prob: float, seq_len: int) -> float:
    """M: the expected masked positions per sample."""
    return mask_prob * seq_len


def forward_flops(s: Shape, layers: int, masked: float) -> float:
    """One sample through the embeddings, the first `layers` blocks and the head at `masked` positions."""
    per_token_layer = 2 * block_params(s.arch, s.hidden, s.intermediate) + attention_flops(s.seq_len, s.hidden)
    return layers * s.seq_len * per_token_layer + masked * 2 * head_params(s.hidden, s.vocab)


def train_flops(s: Shape, masked: float) -> float:
    """One sample's forward and backward through the whole model: 3 x forward."""
    return 3 * forward_flops(s, s.layers, masked)


def scoring_flops(s: Shape, exit_layer: int, masked: float) -> float:
    """One candidate's exit-layer scoring (no gradients): forward through `exit_layer` blocks."""
    return forward_flops(s, exit_layer, masked)


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step does, all ranks together, as the config says: the numerators of the
    throughput metrics (pipeline/step.py). Samples skipped as non-finite are not in it (rare)."""
    world_size: int
    seq_len: int
    samples_backprop: int  # m * A * W
    samples_seen: int  # C * A * W: candidates drawn, whether or not the step selects
    samples_scored: int  # candidates scored on a step that selects; 0 for a policy that scores nothing
    train_flops_per_sample: float
    scoring_flops_per_sample: float
    peak_tflops: float | None  # per rank; None where unknown (the CPU)

    def flops(self, selecting_steps: float, steps: int) -> float:
        """All FLOPs of `steps` steps, `selecting_steps` of them selecting: training plus scoring."""
        return self.useful_flops(steps) + selecting_steps * self.samples_scored * self.scoring_flops_per_sample

    def useful_flops(self, steps: int) -> float:
        """The backpropagated samples' training FLOPs only: the work a vanilla step would do."""
        return steps * self.samples_backprop * self.train_flops_per_sample


def step_work(cfg: Config, world_size: int, vocab: int, seq_len: int, peak_tflops: float | None) -> StepWork:
    """The StepWork of a run: policy, micro-batch, oversampling and exit layer from its config."""
    from pipeline.sift.policies import POLICIES

    s, t, d = shape_of(cfg, vocab, seq_len), cfg.train, cfg.data
    masked = expected_masked(d.mask_prob, seq_len)
    policy = POLICIES[cfg.select.policy]
    exit_layer = exit_layer_run(cfg)
    scored_masked = masked * (d.mask_share if policy.mask_positions_only else 1.0)
    per_step = t.grad_accum * world_size
    candidates = candidates_per_micro_step(cfg) * per_step
    return StepWork(world_size, seq_len, t.micro_batch * per_step, candidates,
                    candidates if exit_layer is not None else 0, train_flops(s, masked),
                    scoring_flops(s, exit_layer, scored_masked) if exit_layer is not None else 0.0, peak_tflops)


def peak_for_device(device_name: str) -> float | None:
    """Dense BF16 peak TFLOP/s of a GPU by its name (torch.cuda.get_device_name()); None if unknown."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS[key]
    return None


def resolve_peak(configured: float, device_name: str) -> float | None:
    """train.peak_tflops when set (> 0), else the table's value for this device."""
    return configured if configured > 0 else peak_for_device(device_name)


def throughput_metrics(work: StepWork, steps: int, selecting_steps: float, seconds: float) -> dict[str, float]:
    """The throughput/* metrics of `steps` steps that took `seconds` of step time, `selecting_steps` of
    them selecting. Samples and tokens are all ranks' per second; TFLOP/s are per rank (all FLOPs over
    the world size), so that they compare with one GPU's peak. MFU only where the peak is known."""
    per_rank = seconds * work.world_size * 1e12
    backprop, seen = steps * work.samples_backprop / seconds, steps * work.samples_seen / seconds
    metrics = {"throughput/samples_per_s": backprop, "throughput/tokens_per_s": backprop * work.seq_len,
               "throughput/seen_samples_per_s": seen, "throughput/seen_tokens_per_s": seen * work.seq_len,
               "throughput/tflops": work.flops(selecting_steps, steps) / per_rank}
    if work.peak_tflops:
        metrics["throughput/mfu"] = metrics["throughput/tflops"] / work.peak_tflops
        metrics["throughput/mfu_backprop"] = work.useful_flops(steps) / per_rank / work.peak_tflops
    return metrics
