"""A newcomer's first hour, through the real command line: runs that never mix, explicit resumes, a
fast --help, a config reference, a progress bar that follows the real budget, an end-of-run summary,
and a checkout left clean. Each test failed before its change (said in its docstring)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from tests.conftest import REPO, clean_env

HEAVY = ("deepspeed", "transformers", "mlflow")


def cli(args: list[str], cwd, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**env))


def tiny(data, *sets: str) -> list[str]:
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.dir={data}"]
    return args + [x for s in sets for x in ("--set", s)]


def test_the_same_command_twice_gives_two_runs_that_never_mix(tiny_data, tmp_path):
    """Before: both ran in the default runs/demo, so the second silently resumed the first (one MLflow
    run, mixed curves). Now each gets runs/<name>-<time>-<hex>, printed, and --resume is explicit."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = cli(tiny(tiny_data, "train.max_steps=2", "train.export=false", f"tracking.uri={uri}"), tmp_path)
    second = cli(tiny(tiny_data, "train.max_steps=2", "train.export=false", f"tracking.uri={uri}"), tmp_path)
    assert first.returncode == second.returncode == 0, second.stderr[-2000:]
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and all(re.fullmatch(r"vanilla-tiny-s0-\d{8}-\d{6}-[0-9a-f]{4}", d.name) for d in dirs)
    for result, run_dir in zip((first, second), dirs):
        assert f"run directory runs/{run_dir.name}" in result.stderr
    ids = {json.loads((d / "mlflow_run.json").read_text())["run_id"] for d in dirs}
    assert len(ids) == 2
    resumed = cli(tiny(tiny_data, "train.max_steps=4", "train.export=false", f"tracking.uri={uri}") +
                  ["--resume", str(dirs[0])], tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    assert json.loads((dirs[0] / "mlflow_run.json").read_text())["run_id"] in ids
    nothing = cli(tiny(tiny_data) + ["--resume", str(tmp_path / "empty")], tmp_path)
    assert nothing.returncode == 2 and nothing.stderr.strip().startswith("error: nothing to resume")


def test_help_and_argument_errors_import_no_heavy_library(tmp_path):
    """Before: --help imported DeepSpeed, transformers and MLflow (7-9 s on a quiet machine)."""
    for args, code in ((["--help"], 0), (["--set", "train.lr=fast"], 2), (["--set", "nope=1"], 2)):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.train", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=120, env=clean_env())
        assert result.returncode == code, result.stderr[-2000:]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not imported & set(HEAVY), (args, imported & set(HEAVY))
    assert "torch" not in imported  # an unknown key is refused before torch is needed


def test_print_config_explains_every_key_and_config_md_is_current():
    """Before: no reference; a user read pipeline/config.py. Now --print-config prints the resolved
    config with each key's meaning, and docs/CONFIG.md is generated from the same comments."""
    from pipeline.config_help import key_help, markdown

    result = cli(["--print-config", "--config", str(REPO / "configs/study.yaml"), "--set", "train.lr=2e-3"], REPO)
    assert result.returncode == 0, result.stderr
    assert "  lr: 0.002  # peak learning rate (AdamW)" in result.stdout
    assert "  positions: \"rotary\"  # " in result.stdout
    assert all(text for text in key_help().values()), [k for k, v in key_help().items() if not v]
    assert (REPO / "docs" / "CONFIG.md").read_text() == markdown(), "regenerate: python -m pipeline.config_help > docs/CONFIG.md"


def test_the_bar_follows_the_time_budget_and_a_summary_ends_the_run(tiny_data, tmp_path):
    """Before: with max_steps 100000 and a 3 s budget the bar said 0% and an ETA of hours, and the run
    ended without saying why, how good it was or where to look."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cli(tiny(tiny_data, "train.max_steps=100000", "train.max_seconds=3", "train.export=false",
                      f"tracking.uri={uri}", f"train.out_dir={tmp_path}/run"), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    final_bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if "step " in line and "%|" in line]
    assert final_bar and final_bar[-1].lstrip().startswith("100%") and "/3 s" in final_bar[-1], final_bar[-1:]
    out = result.stdout
    assert re.search(r"== run ended: \d+ s of training of train.max_seconds=3", out), out
    assert re.search(r"final eval: loss \d+\.\d+ · accuracy \d\.\d+ · \[MASK\] accuracy \d\.\d+ \(\d+\.\dx the "
                     r"context-free \d\.\d+\)", out), out
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert f"MLflow run {run_id} in experiment 'sift-pretrain': mlflow ui --backend-store-uri {uri} --host 127.0.0.1" in out
    assert f"checkpoint {tmp_path}/run/checkpoints/step" in out


def test_a_run_and_a_comparison_leave_the_checkout_clean(tiny_data, tmp_path):
    """Before: mlflow.db.lock and compare_out/ showed up as untracked files. Here: a copy of the
    working tree as a git repository, a run and a comparison with every default, then git status."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    checkout = tmp_path / "checkout"
    for name in tracked:
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + command, cwd=checkout, check=True, capture_output=True)
    env = {"PYTHONPATH": str(checkout)}
    assert cli(tiny(tiny_data, "train.max_steps=2"), checkout, **env).returncode == 0
    compare = subprocess.run([sys.executable, "-m", "pipeline.compare", "--experiment", "sift-pretrain", "--target",
                              "0.01"],
                             cwd=checkout, capture_output=True, text=True, timeout=300, env=clean_env(**env))
    assert compare.returncode == 0, compare.stderr[-2000:]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout,
                            capture_output=True, text=True).stdout
    assert status == "", status
