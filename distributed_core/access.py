"""Who may call the routes that change state or start processes.

A browser on the ComfyUI page itself (same origin) may; so may any client that sends the
extension's shared secret in ``X-Distributed-Secret``. Everything else is refused, so a web page
on another site, or a stranger who finds the port, cannot reconfigure GPUs or start processes.
Results from workers carry their own per-job token instead (see jobs.py).
"""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from .config import EXTENSION_DIR

HEADER = "X-Distributed-Secret"
SECRET_FILE = EXTENSION_DIR / "secret.key"   # ignored by git
ENV_VAR = "COMFYUI_DISTRIBUTED_SECRET_FILE"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
OPEN_PATHS = {"/distributed/result"}  # guarded by the per-job token


def secret_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or SECRET_FILE)


def load_or_create(path: Path | None = None) -> str:
    """The shared secret, made on first use and readable by the owner only."""
    path = path or secret_path()
    try:
        value = path.read_text(encoding="utf-8").strip()
        if len(value) >= 16:
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value


def needs_check(method: str, path: str) -> bool:
    path = path[4:] if path.startswith("/api/") else path
    return (path.startswith("/distributed/") and method.upper() not in SAFE_METHODS
            and path not in OPEN_PATHS)


def same_origin(headers, host: str) -> bool:
    """A browser request from the page ComfyUI itself served."""
    if headers.get("Sec-Fetch-Site") == "same-origin":
        return True
    origin = headers.get("Origin")
    return bool(origin) and urlsplit(origin).netloc.lower() == (host or "").lower()


def allowed(method: str, path: str, headers, host: str, secret: str) -> bool:
    if not needs_check(method, path):
        return True
    given = headers.get(HEADER, "")
    if given and hmac.compare_digest(given.encode(), secret.encode()):
        return True
    return same_origin(headers, host)
