"""How long a newcomer waits for `--help` and for an argument error, beside `import torch` in the same run.

    python benchmarks/bench_cli_start.py [--repeats 7]

Each command runs as a fresh process, the commands interleaved round by round so that machine drift
lands on all of them; prints one Markdown table (median and min wall seconds) and the load average.
docs/BENCHMARKS.md, "CLI start-up", has the numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "python -m pipeline.train --help": [sys.executable, "-m", "pipeline.train", "--help"],
    "python -m pipeline.train --set train.lr=fast (exit 2)": [sys.executable, "-m", "pipeline.train", "--set",
                                                               "train.lr=fast"],
    "python -m pipeline.compare --help": [sys.executable, "-m", "pipeline.compare", "--help"],
    "python -m data_prep --help": [sys.executable, "-m", "data_prep", "--help"],
}


def time_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    for cmd in COMMANDS.values():  # warm the page cache once; not timed
        time_once(cmd)
    load_start = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(time_once(cmd))
    torch_median = statistics.median(times['python -c "import torch"'])
    print(f"{args.repeats} runs each, interleaved; load average {load_start:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| command | median s | min s | / import torch |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.2f} | {min(values):.2f} | {median / torch_median:.2f} |")


if __name__ == "__main__":
    main()
