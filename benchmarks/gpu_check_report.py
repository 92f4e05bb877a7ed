"""The GPU check's environment record and its one table (benchmarks/gpu_check.py runs the campaign).

Pure formatting over the campaign's result dict (what gpu_check.json holds), so the table can be
printed again from a saved JSON: `python benchmarks/gpu_check_report.py runs/gpu-check/<time>/gpu_check.json`.
A figure the machine cannot give (CUDA-only on the CPU, MFU without a known peak) is "n/a".
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

NA = "n/a"


def environment(info) -> dict:
    """Versions, device, DeepSpeed's compatible ops and the SDPA backends: what a GPU user checks first."""
    import deepspeed
    import torch
    import transformers

    from pipeline.distributed import device_name

    cuda = info.device.type == "cuda"
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "nccl": nccl_version() if cuda else None,
           "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
           "device": device_name(info.device), "threads": torch.get_num_threads(),
           "gpu_memory_gib": torch.cuda.get_device_properties(info.device).total_memory / 2**30 if cuda else None,
           "deepspeed_ops": sorted(op for op, ok in deepspeed.ops.__compatible_ops__.items() if ok),
           "sdpa_backends": None}
    if cuda:
        b = torch.backends.cuda
        env["sdpa_backends"] = [name for name, on in (("flash", b.flash_sdp_enabled()), ("cudnn", b.cudnn_sdp_enabled()),
                                                      ("mem_efficient", b.mem_efficient_sdp_enabled()),
                                                      ("math", b.math_sdp_enabled())) if on]
    return env


def nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()  # a tuple in torch 2.x, an int in older releases
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def na(value, spec: str = "") -> str:
    return NA if value is None else format(value, spec)


def host_syncs(arm: dict) -> str:
    """Host syncs per step counted by pipeline/syncs.py (project / DeepSpeed / other), n/a without it."""
    syncs = arm.get("host_syncs")
    if syncs is None:
        return NA
    return f"{syncs['project']:g} project / {syncs['deepspeed']:g} DeepSpeed / {syncs['other']:g} other"


def environment_rows(result: dict) -> list[tuple[str, str]]:
    env = result["environment"]
    memory = na(env["gpu_memory_gib"], ".1f")
    return [("torch / CUDA / NCCL", f"{env['torch']} / {na(env['cuda'])} / {na(env['nccl'])}"),
            ("DeepSpeed / transformers / Python", f"{env['deepspeed']} / {env['transformers']} / {env['python']}"),
            ("device / GPU memory GiB", f"{env['device']} / {memory}"),
            ("DeepSpeed ops compatible", ", ".join(env["deepspeed_ops"]) or "none"),
            ("attention backend (SDPA kernels)",
             f"{result['arms']['vanilla']['attention']} ({', '.join(env['sdpa_backends'] or []) or NA})"),
            ("throughput arms: config, precision", arms_setup(result["plan"])
             + f"; static shapes {'on' if result['arms']['vanilla']['static_shapes'] else 'off'}"),
            ("throughput arms' data", result["data"])]


def arms_setup(plan: dict) -> str:
    sets = ", ".join(s for s in plan["arm_sets"] if not s.startswith(("data.", "train.ds_configs")))
    ds = next((s.split("=", 1)[1] for s in plan["arm_sets"] if s.startswith("train.ds_configs")), "")
    ds = ds.strip("[]").replace("ds_configs/", "").replace(".json", "")
    return f"{plan['arm_config']} {sets}; {ds}; {plan['arm_seconds']:g} s each after {plan['warmup_steps']} warm-up steps"


def arm_rows(name: str, arm: dict, vanilla: dict) -> list[tuple[str, str]]:
    m = arm["metrics"]
    step, model = m["time/step_s"], arm["model_step_s"]
    rows = [(f"{name}: steps timed", str(arm["steps"])),
            (f"{name}: samples/s backprop / seen",
             f"{m['throughput/samples_per_s']:.1f} / {m['throughput/seen_samples_per_s']:.1f}"),
            (f"{name}: tokens/s backprop / seen",
             f"{m['throughput/tokens_per_s']:.0f} / {m['throughput/seen_tokens_per_s']:.0f}"),
            (f"{name}: TFLOP/s per rank (scoring included)", f"{m['throughput/tflops']:.4g}"),
            (f"{name}: MFU / MFU backprop",
             f"{na(m.get('throughput/mfu'), '.1%')} / {na(m.get('throughput/mfu_backprop'), '.1%')}"
             + ("" if arm["peak_tflops"] else " (peak unknown)")),
            (f"{name}: step s measured / cost model (no loader)", f"{step:.4f} / {model:.4f} = {step / model:.2f}x"),
            (f"{name}: scoring share of the step", f"{m.get('select/scoring_share', 0.0):.1%}"
             + (f" (model {arm['model_scoring_s'] / model:.1%})" if arm["model_scoring_s"] else "")),
            (f"{name}: host syncs per step", host_syncs(arm)),
            (f"{name}: peak GPU memory GiB", na(arm.get("peak_memory_gib"), ".2f"))]
    if arm is not vanilla:
        rows.append((f"{name} / vanilla: step time (FLOPs)",
                     f"{step / vanilla['metrics']['time/step_s']:.2f}x ({arm['flops_per_step'] / vanilla['flops_per_step']:.2f}x)"))
    return rows


def zero3_rows(z: dict) -> list[tuple[str, str]]:
    losses = " ".join(f"{loss:.3f}" for loss in z["losses"])
    return [("ZeRO-3 SIFT smoke (all weights partitioned): losses", f"{z['steps']} steps, {'finite' if z['finite'] else 'NOT finite'}: {losses}"),
            ("ZeRO-3: exit scoring at the last layer vs exact losses",
             f"max |diff| {z['max_abs_diff']:.2e} (tolerance {z['tolerance']:.0e}): {'ok' if z['ok'] else 'FAILED'}")]


def study_rows(result: dict) -> list[tuple[str, str]]:
    s = result["study"]
    reached = f"{s['seconds_to_2x']:.0f} s" if s["seconds_to_2x"] is not None else \
        f"not reached in {s['max_seconds']:g} s"
    return [("study recipe: data, micro-batch", f"{result['study_data']}; {s['micro_batch']}"),
            ("study recipe: seconds to [MASK] accuracy >= 2x reference",
             f"{reached} ({s['steps']} steps; final {na(s['mask_accuracy'], '.3f')} vs reference "
             f"{na(s['reference'], '.3f')}; {s['wall_s']:.0f} s wall)")]


def rows(result: dict) -> list[tuple[str, str]]:
    arms = result["arms"]
    out = environment_rows(result)
    for name, arm in arms.items():
        out += arm_rows(name, arm, arms["vanilla"])
    out += zero3_rows(result["zero3"]) + study_rows(result)
    kind = "CPU dry run" if result["dry_run"] else "GPU run"
    return out + [("campaign wall time", f"{result['wall_s']:.0f} s ({kind})")]


def table(rows_: list[tuple[str, str]]) -> str:
    width = max(len(check) for check, _ in rows_)
    lines = [f"| {'check'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    return "\n".join(lines + [f"| {check.ljust(width)} | {value} |" for check, value in rows_])


def failures(result: dict) -> list[str]:
    """What makes the check fail (exit 1): no timed steps, non-finite losses, ZeRO-3 scoring off."""
    failed = [f"{name} timed no step" for name, arm in result["arms"].items() if arm["steps"] == 0]
    if not result["zero3"]["ok"]:
        failed.append("ZeRO-3 SIFT smoke (losses or exit scoring)")
    return failed


if __name__ == "__main__":
    print(table(rows(json.loads(Path(sys.argv[1]).read_text()))))
