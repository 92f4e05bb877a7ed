"""The block a run prints when it ends: why it stopped, how far it went, how good it is, where it is."""
from __future__ import annotations

from pipeline.progress import Progress


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on the store this run logged to."""
    store = uri if uri.startswith(("sqlite:", "postgresql:", "mysql:", "file:")) else None
    return (f"mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000" if store
            else f"open {uri} in a browser")


def summary(reason: str, p: Progress, last_eval: dict[str, float], reference: float, checkpoint: str,
            export_dir: str, run_id: str, experiment: str, uri: str) -> str:
    """One block of plain lines (the caller prints it on rank 0)."""
    lines = [f"== run ended: {reason}",
             f"   steps {p.step:,} · samples seen {p.samples_seen:,} · backpropagated {p.samples_backprop:,} · "
             f"training {p.train_time_s:,.0f} s (wall clock {p.wall_clock_s:,.0f} s)"]
    if last_eval:
        mask = last_eval.get("eval/mask_accuracy", float("nan"))
        regime = f" ({mask / reference:.1f}x the context-free {reference:.4f})" if reference > 0 else ""
        lines.append(f"   final eval: loss {last_eval['eval/loss']:.4f} · accuracy {last_eval['eval/accuracy']:.4f} · "
                     f"[MASK] accuracy {mask:.4f}{regime}")
    lines.append(f"   checkpoint {checkpoint or '(none)'}" + (f" · export {export_dir}" if export_dir else ""))
    if run_id:
        lines.append(f"   MLflow run {run_id} in experiment {experiment!r}: {ui_command(uri)}, then open "
                     "http://127.0.0.1:5000 and that experiment")
    return "\n".join(lines)
