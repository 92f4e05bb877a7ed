"""Look at MLflow runs in a real browser: an `mlflow server` on loopback plus headless Chromium.

    python benchmarks/mlflow_ui.py --store runs/study/mlflow.db --experiment study-cpu \
        --screenshot docs/img/mlflow_compare.png [--metric eval/accuracy]

Starts `mlflow server --backend-store-uri sqlite:///STORE --host 127.0.0.1 --port <free>`, waits for
/health, checks through the REST API that the experiment's runs and the metric are there, opens the
run-comparison page (#/compare-runs) in headless Chromium (Debian package `chromium`), checks that
the rendered DOM names every run, saves a screenshot, and stops the server by its PID.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


class UICheckError(RuntimeError):
    """The server, the API or the page did not show what was expected."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise UICheckError("no chromium on PATH: install the Debian package (apt-get install -y chromium)")


class MlflowServer:
    """`with MlflowServer(store) as base_url:` - a server on 127.0.0.1, stopped by its PID on exit."""

    def __init__(self, store: Path, timeout_s: float = 90.0) -> None:
        self.store, self.timeout_s, self.port = store.resolve(), timeout_s, free_port()
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.store}",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UICheckError(f"mlflow server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        return base
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise UICheckError(f"mlflow server did not answer /health in {self.timeout_s:.0f} s; log: {self.log.name}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers only
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def experiment_runs(base: str, experiment: str, metric: str) -> tuple[str, list[dict]]:
    """(experiment id, runs) through the REST API; every run must hold `metric`."""
    try:
        exp = api(base, "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))
    except urllib.error.HTTPError as err:
        raise UICheckError(f"experiment {experiment!r} not found on the server ({err.code})") from err
    exp_id = exp["experiment"]["experiment_id"]
    runs = api(base, "runs/search", {"experiment_ids": [exp_id], "max_results": 200}).get("runs", [])
    runs = [r for r in runs if any(t["key"] == "sift.kind" and t["value"] == "train"
                                   for t in r["data"].get("tags", []))]
    if not runs:
        raise UICheckError(f"experiment {experiment!r} has no training runs")
    for run in runs:
        keys = {m["key"] for m in run["data"].get("metrics", [])}
        if metric not in keys:
            raise UICheckError(f"run {run['info']['run_id']} has no metric {metric} (has {sorted(keys)[:8]}...)")
    return exp_id, runs


def compare_url(base: str, exp_id: str, run_ids: list[str]) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids))
    return f"{base}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"


def chromium(url: str, *, dump_dom: bool = False, screenshot: Path | None = None, size: str = "1400,1000",
             budget_ms: int = 20000) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
               f"--virtual-time-budget={budget_ms}"]
        if dump_dom:
            cmd.append("--dump-dom")
        if screenshot:
            cmd.append(f"--screenshot={screenshot.resolve()}")
        out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise UICheckError(f"chromium exited with {out.returncode}: {out.stderr[-800:]}")
    return out.stdout


def check_ui(store: Path, experiment: str, metric: str, screenshot: Path | None) -> dict:
    """Everything above; returns what was seen (run names, the URL, the screenshot path)."""
    with MlflowServer(store) as base:
        exp_id, runs = experiment_runs(base, experiment, metric)
        names = sorted(r["info"]["run_name"] for r in runs)
        url = compare_url(base, exp_id, [r["info"]["run_id"] for r in runs])
        dom = chromium(url, dump_dom=True)
        missing = [n for n in names if n not in dom]
        if missing:
            raise UICheckError(f"the comparison page does not name runs {missing} ({len(dom)} chars of DOM)")
        if metric not in dom:
            raise UICheckError(f"the comparison page does not show the metric {metric}")
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            chromium(url, screenshot=screenshot)
            if not screenshot.is_file() or screenshot.stat().st_size < 2000:
                raise UICheckError(f"no usable screenshot at {screenshot}")
    return {"runs": names, "url": url, "screenshot": str(screenshot) if screenshot else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="the sqlite file of the MLflow backend store")
    p.add_argument("--experiment", required=True)
    p.add_argument("--metric", default="eval/accuracy")
    p.add_argument("--screenshot", type=Path)
    args = p.parse_args(argv)
    try:
        seen = check_ui(args.store, args.experiment, args.metric, args.screenshot)
    except UICheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(seen, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
