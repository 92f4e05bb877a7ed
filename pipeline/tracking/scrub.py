"""What may reach MLflow, the journal and log lines: flat string params, and nothing that looks like a secret.
- A key that names a secret (``hf_token``, ``db.password``, ``OPENAI_APIKEY``) gets the value ``REDACTED``; a secret
  word counts at the end of a word only, so ``data.tokenizer``, ``train.tokens_per_s`` and ``author`` are kept.
- A known secret (a secret-named environment variable's value, a credential in the tracking URI) is replaced
  wherever it appears, small files sent as artifacts included; in any URL, credentials are (`redact_url`).
"""

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import flatten

REDACTED = "REDACTED"
SECRET_KEY_RE = re.compile(r"(token|passwords?|passwd|secrets?|api_?key|credentials?|auth(orization)?)(?![a-z])",
                           re.IGNORECASE)
_QUERY_KEY_RE = re.compile(r"(.*[_.-])?(key|sig|signature|pwd|pass)", re.IGNORECASE)  # also credentials in a URL
_USERINFO_RE = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^/?#@\s:'\"]*)(?::([^/?#\s'\"]*))?@", re.IGNORECASE)
_QUERY_RE = re.compile(r"([?&;])([^=&#\s'\"?]+)=([^&#\s'\"]*)")
MIN_SECRET_LEN = 6  # shorter values ("1", "true") are flags: redacting them would mangle every param
_NOT_SECRETS = {"true", "false", "none", "null", "enabled", "disabled"}
PARAM_VALUE_LIMIT = 500  # MLflow servers before 2.x reject longer param values
SCAN_LIMIT_BYTES = 16 * 1024 * 1024  # larger artifact files are weights and data, not configs or logs


def is_secret_key(key: str) -> bool:
    """True when a param/tag/env name says its value is a secret."""
    return SECRET_KEY_RE.search(key) is not None


def _secret_query(m: re.Match) -> bool:
    return bool(m[3]) and (is_secret_key(m[2]) or _QUERY_KEY_RE.fullmatch(m[2]) is not None)


def redact_url(text: str, *, drop_userinfo: bool = False) -> str:
    """`text` with the credentials in its URLs redacted: ``user:pw@`` becomes ``user:REDACTED@``, a bare
    ``token@`` ``REDACTED@`` (both dropped with `drop_userinfo`: a URI to connect with, credentials then
    come from the environment), token-like query values (``?token=``, ``&sig=``, ``api_key=``) REDACTED."""
    def userinfo(m: re.Match) -> str:  # the user name of ``user:password@`` stays
        return m[1] if drop_userinfo else f"{m[1]}{m[2] + ':' if m[3] is not None else ''}{REDACTED}@"

    text = _USERINFO_RE.sub(userinfo, text)
    return _QUERY_RE.sub(lambda m: f"{m[1]}{m[2]}={REDACTED}" if _secret_query(m) else m[0], text)


def known_secrets(uri: str = "") -> list[str]:
    """Values to redact wherever they appear, longest first (so overlaps redact fully): secret-named
    environment variables' and the credentials inside `uri` (the tracking URI)."""
    values = {value for name, value in os.environ.items() if is_secret_key(name)}
    values.update(m[2] if m[3] is None else m[3] for m in _USERINFO_RE.finditer(uri))
    values.update(m[3] for m in _QUERY_RE.finditer(uri) if _secret_query(m))
    return sorted((v for v in values if len(v) >= MIN_SECRET_LEN and v.strip().lower() not in _NOT_SECRETS),
                  key=len, reverse=True)


def scrub_text(text: str, secrets: list[str]) -> str:
    """`text` with every known secret and every credential in a URL replaced by REDACTED."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return redact_url(text)


def describe_error(exc: BaseException, secrets: list[str]) -> str:
    """An exception's first line for a log message, scrubbed (MLflow's errors quote URLs)."""
    return scrub_text(f"{type(exc).__name__}: {exc}".splitlines()[0], secrets)[:300]


def scrub_obj(obj: Any, secrets: list[str]) -> Any:
    """Params, tags or a JSON-like object with secret-named keys and secret values redacted."""
    if isinstance(obj, Mapping):
        return {key: REDACTED if is_secret_key(str(key)) else scrub_obj(value, secrets) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_obj(value, secrets) for value in obj]
    return scrub_text(obj, secrets) if isinstance(obj, str) else obj


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """Flat string params (nested dicts to dotted keys, as in the config), cut to PARAM_VALUE_LIMIT."""
    texts = {key: str(value) for key, value in flatten(params).items()}
    return {k: v if len(v) <= PARAM_VALUE_LIMIT else v[:PARAM_VALUE_LIMIT - 3] + "..." for k, v in texts.items()}


@contextlib.contextmanager
def staged_artifact(path: str, secrets: list[str]) -> Iterator[str]:
    """Yield the path to upload for `path`: itself, or a redacted copy of the same base name in a
    temporary directory (removed on exit) when a file of it holds a known secret."""
    src, encoded = Path(path), [s.encode() for s in secrets]
    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    files = [p for p in files if encoded and not p.is_symlink() and p.stat().st_size <= SCAN_LIMIT_BYTES]
    dirty = [p for p, data in ((p, p.read_bytes()) for p in files) if any(secret in data for secret in encoded)]
    if not dirty:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sift-redact-") as tmp:
        dst = Path(tmp) / src.name
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        for file in dirty:
            data = file.read_bytes()
            for secret in encoded:
                data = data.replace(secret, REDACTED.encode())
            (dst if src.is_file() else dst / file.relative_to(src)).write_bytes(data)
        yield str(dst)
