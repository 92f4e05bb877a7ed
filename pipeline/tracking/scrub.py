"""What may leave the process for MLflow: flat string params, and nothing that looks like a secret.

Two rules keep environment secrets (tokens, passwords) out of MLflow params, tags and artifacts:
- a param/tag/dict key that names a secret (``hf_token``, ``db.password``, ``OPENAI_APIKEY``) has
  its value replaced by ``REDACTED``;
- any text equal to or containing the value of a secret-named environment variable has that value
  replaced by ``REDACTED`` (params, tags, dict artifacts, and small files sent as artifacts).

The key pattern matches a secret word at the end of a word (``PGPASSWORD``, ``github_token``,
``oauth``) but not as the start of a longer word, so ``data.tokenizer``, ``train.tokens_per_s``
and ``author`` are kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REDACTED = "REDACTED"
SECRET_KEY_RE = re.compile(
    r"(token|passwords?|passwd|secrets?|api_?key|credentials?|auth(orization)?)(?![a-z])",
    re.IGNORECASE,
)
# Shorter values ("1", "true", "false") are flags, not secrets; redacting them would mangle
# every param that happens to contain them.
MIN_SECRET_LEN = 6
_NOT_SECRETS = {"true", "false", "none", "null", "enabled", "disabled"}
# MLflow servers before 2.x reject param values over 500 characters; stay under that everywhere.
PARAM_VALUE_LIMIT = 500
# Files sent as artifacts are scanned for secrets up to this size (configs, manifests, logs);
# larger files are model weights and data.
SCAN_LIMIT_BYTES = 16 * 1024 * 1024


def is_secret_key(key: str) -> bool:
    """True when a param/tag/env name says its value is a secret."""
    return SECRET_KEY_RE.search(key) is not None


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first (so overlaps redact fully)."""
    environ = os.environ if environ is None else environ
    values = {
        value for name, value in environ.items()
        if is_secret_key(name) and len(value) >= MIN_SECRET_LEN
        and value.strip().lower() not in _NOT_SECRETS
    }
    return sorted(values, key=len, reverse=True)


def scrub_text(text: str, secrets: list[str]) -> str:
    """`text` with every occurrence of a secret value replaced by REDACTED."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_mapping(items: Mapping[str, str], secrets: list[str]) -> dict[str, str]:
    """Params or tags with secret-named keys and secret values redacted."""
    return {
        key: REDACTED if is_secret_key(key) else scrub_text(value, secrets)
        for key, value in items.items()
    }


def scrub_obj(obj: Any, secrets: list[str]) -> Any:
    """A JSON-like object with secret-named keys and secret values redacted, recursively."""
    if isinstance(obj, Mapping):
        return {
            key: REDACTED if is_secret_key(str(key)) else scrub_obj(value, secrets)
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub_obj(value, secrets) for value in obj]
    if isinstance(obj, str):
        return scrub_text(obj, secrets)
    return obj


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: {"select": {"policy": "x"}} -> {"select.policy": "x"}."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def param_values(params: Mapping[str, Any]) -> dict[str, str]:
    """Flat string params, each value cut to PARAM_VALUE_LIMIT characters (marked with '...')."""
    out = {}
    for key, value in flatten(params).items():
        text = str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        out[key] = text
    return out


def _file_has_secret(path: Path, secrets: list[bytes]) -> bool:
    if path.is_symlink() or path.stat().st_size > SCAN_LIMIT_BYTES:
        return False
    data = path.read_bytes()
    return any(secret in data for secret in secrets)


def _redacted_copy(src: Path, dst: Path, secrets: list[bytes]) -> None:
    data = src.read_bytes()
    for secret in secrets:
        data = data.replace(secret, REDACTED.encode())
    dst.write_bytes(data)


def _files_with_secrets(root: Path, secrets: list[bytes]) -> set[Path]:
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return {p for p in files if _file_has_secret(p, secrets)}


@contextlib.contextmanager
def staged_artifact(path: str, secrets: list[str]) -> Iterator[str]:
    """Yield a path to upload in place of `path`: itself, or a redacted copy when needed.

    The copy keeps the base name (so the artifact's name is unchanged) and lives in a temporary
    directory removed on exit. Only files up to SCAN_LIMIT_BYTES are scanned.
    """
    src = Path(path)
    encoded = [s.encode() for s in secrets]
    dirty = _files_with_secrets(src, encoded) if encoded else set()
    if not dirty:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sift-redact-") as tmp:
        dst = Path(tmp) / src.name
        if src.is_file():
            _redacted_copy(src, dst, encoded)
        else:
            shutil.copytree(src, dst, symlinks=True)
            for file in dirty:
                _redacted_copy(file, dst / file.relative_to(src), encoded)
        yield str(dst)
