"""Who may call the extension's routes, and what the HTTP API may ask ComfyUI to run.

The model. ComfyUI's own API has no authentication, and this module does not change that. It guards
what the extension adds: its routes under ``/distributed/`` start processes, reconfigure the
cluster, read worker logs and hand out the secret. Exactly two kinds of caller may use them:

- a client that sends the shared secret in ``X-Distributed-Secret`` (scripts, and the panel in a
  browser on another machine, which asks the user for the secret once and keeps it);
- a *local browser*: a browser on the master's own machine, showing a page that ComfyUI itself
  served. Only such a request may read the secret (``GET /distributed/secret``).

Headers alone never make a local browser, since any program can send any header: the TCP peer
must be this machine (loopback, or the very address the connection arrived at), so a request from
another machine needs the secret whatever it claims. On this machine, a page of another web site
is told apart by the headers that browsers set and page scripts cannot change (``Sec-Fetch-Site``,
``Origin``), and a page reached through DNS rebinding (``Host: evil.example``, resolving to this
machine) by its ``Host``, which must be one of this master's own names or addresses.

Results from workers (``POST /distributed/result``) carry a per-job token instead (see jobs.py).
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import shlex
import socket
import stat
import time
from functools import lru_cache
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from .comfy_flags import ComfyFlags
from .config import EXTENSION_DIR

log = logging.getLogger("comfyui-distributed")

HEADER = "X-Distributed-Secret"
SECRET_FILE = EXTENSION_DIR / "secret.key"   # ignored by git
ENV_VAR = "COMFYUI_DISTRIBUTED_SECRET_FILE"
PREFIX = "/distributed/"
# A relay (relay.py) is opened with a prompt's share token, which only the master that sent the
# prompt holds; without one it answers the doctor's check that websockets get through, and nothing more.
OPEN_PATHS = {"/distributed/relay"}
SECRET_PATH = "/distributed/secret"   # for a local browser only


# --- the secret file ------------------------------------------------------------------------------

def secret_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or SECRET_FILE)


def _read_secret(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise OSError(f"the secret file {path} was removed while it was being read: restart") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OSError(f"cannot read the secret file {path} ({exc}): fix its permissions, or delete it "
                      "to have a new secret made") from None
    return value if len(value) >= 16 else None


def _keep_private(path: Path) -> None:
    """A secret file that others may read is made readable by its owner only (POSIX)."""
    if os.name != "posix":
        return
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            os.chmod(path, stat.S_IMODE(mode) & 0o700 | 0o600)
            log.warning("[Distributed] %s was readable by other users; it is now readable by its owner only. "
                        "If others may have read it, delete it and restart to make a new secret.", path)
    except OSError as exc:
        log.warning("[Distributed] cannot make %s private (%s): make it readable by its owner only", path, exc)


def load_or_create(path: Path | None = None) -> str:
    """The shared secret, made on first use and readable by the owner only.

    Several instances that start at once agree on one secret: each writes its candidate to a
    private temporary file and links it into place, which fails when another got there first;
    then everyone reads the one that won. The file never exists half-written (but on a file system
    without hard links, where it is created and then written: readers wait for its content)."""
    path = path or secret_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(value + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)  # atomic, and never replaces a file another instance just made
            except FileExistsError:
                pass
            except OSError:  # no hard links here
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w", encoding="utf-8") as handle:
                        handle.write(value + "\n")
                except FileExistsError:
                    pass
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    for _ in range(50):
        value = _read_secret(path)
        if value is not None:
            _keep_private(path)
            return value
        time.sleep(0.02)
    raise OSError(f"the secret file {path} holds no secret (at least 16 characters): delete it and restart "
                  "to have a new one made, or write one into it")


# --- who is asking ---------------------------------------------------------------------------------

def _ip(text: str | None):
    """An address as ipaddress sees it (IPv4-mapped IPv6 as IPv4), or None."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def from_this_machine(peer: str | None, local: str | None) -> bool:
    """Whether the TCP peer is this machine: a loopback address, or the address the connection
    arrived at (what a browser here uses when it opens the master by its network address)."""
    peer_ip = _ip(peer)
    return peer_ip is not None and (peer_ip.is_loopback or peer_ip == _ip(local))


@lru_cache(maxsize=1)
def _machine_names() -> frozenset[str]:
    try:
        name = socket.gethostname().lower().rstrip(".")
    except OSError:
        return frozenset()
    return frozenset({name, name.split(".", 1)[0]} - {""})


def split_host(netloc: str | None) -> tuple[str, int | None] | None:
    """'host:port' (as in Host, or an origin's netloc) -> (host in lower case, port or None); None if malformed."""
    if not netloc or any(c in netloc for c in "/?#@\\ \t"):
        return None
    try:
        parts = urlsplit("//" + netloc)
        return (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return None


def own_host(host_header: str | None, local: str | None) -> bool:
    """Whether a Host header names this master: a loopback address, the address the connection
    arrived at, ``localhost`` (and ``*.localhost``), or this machine's host name. Any other name
    may be a DNS-rebinding page whose name resolves to this machine."""
    parsed = split_host(host_header)
    if parsed is None or not parsed[0]:
        return False
    name = parsed[0]
    address = _ip(name.strip("[]"))
    if address is not None:
        return address.is_loopback or address == _ip(local)
    return name == "localhost" or name.endswith(".localhost") or name in _machine_names()


def same_origin_browser(headers: Mapping[str, str]) -> bool:
    """A browser request from a page of the origin it is sent to, by the headers browsers set
    themselves (Fetch Metadata; browsers without it send Origin on every state-changing request)."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    return bool(headers.get("Origin"))  # checked against Host in local_browser


def local_browser(headers: Mapping[str, str], peer: str | None, local: str | None) -> bool:
    """A browser on the master's own machine, on a page that this master served."""
    host = headers.get("Host")
    if not (from_this_machine(peer, local) and own_host(host, local) and same_origin_browser(headers)):
        return False
    origin = headers.get("Origin")
    if origin is None:
        return True
    try:
        parts = urlsplit(origin)
        netloc = parts.netloc
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and netloc.lower() == (host or "").lower()


def has_secret(headers: Mapping[str, str], secret: str) -> bool:
    given = headers.get(HEADER)
    if not given:
        return False
    # aiohttp keeps bytes that are not UTF-8 as surrogates: compare bytes, whatever was sent
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode("utf-8"))


def route_path(path: str) -> str:
    return path[4:] if path.startswith("/api/") else path


def is_guarded(path: str) -> bool:
    path = route_path(path)
    return path.startswith(PREFIX) and path not in OPEN_PATHS


def refusal(path: str, headers: Mapping[str, str], peer: str | None, local: str | None,
            secret: str, secret_file: str = "") -> str | None:
    """None when the request may go on, else why not (for a 403 answer).

    Every route of the extension but the result upload needs the secret or a local browser,
    whatever its method: reads too (logs, config, the secret itself)."""
    if not is_guarded(path):
        return None
    if route_path(path) == SECRET_PATH:
        if local_browser(headers, peer, local):
            return None
        return ("the secret is shown only in a browser on the master's own machine; elsewhere, read it "
                f"from the file {secret_file or 'secret.key'} on that machine")
    if has_secret(headers, secret) or local_browser(headers, peer, local):
        return None
    return (f"this route needs the {HEADER} header with the master's secret (the Distributed panel on the "
            f"master's machine shows it; it is also in {secret_file or 'secret.key'} there), or the ComfyUI "
            "page opened in a browser on the master's own machine")


# --- extra_args through the HTTP API -----------------------------------------------------------------

# ComfyUI flags that the HTTP API may put in a worker's (or the master's) extra_args: each tunes how
# ComfyUI uses the GPU, memory or logging, and none of them widens who can reach the instance
# (--listen, --enable-cors-header, --tls-*, --multi-user), exposes or loads files (any directory or
# path flag, --extra-model-paths-config, --front-end-root, --database-url), loads code
# (--whitelist-custom-nodes, a --front-end-version from any repository but ComfyUI's own), talks to
# other servers (--comfy-api-base) or changes the port. Names are matched exactly: ComfyUI's argparse
# also takes unambiguous abbreviations, so a prefix of a refused flag (--enable-cors) could otherwise
# slip through. The value of each flag that takes one is checked too, and no value may start with
# '-' (--fast=--listen). The list spans ComfyUI versions: for the master and its local workers a
# flag must also be one that their ComfyUI declares (comfy_flags.py), since an unknown flag makes
# ComfyUI exit at start, and an allowed name that ComfyUI lacks could be taken as an abbreviation of
# a refused one. The config file edited by hand may hold any flag: its owner wrote it.
# name -> None (takes no value), or a function that says whether a value is acceptable;
# OPTIONAL_VALUE flags take one value or none, MANY_VALUES any number (up to MOST_VALUES).
def _word(value: str) -> bool:
    return value.replace("_", "").replace("-", "").isalnum() and len(value) <= 64


def _number(value: str) -> bool:
    try:
        return 0 <= float(value) < 1e6
    except ValueError:
        return False


def _whole(value: str) -> bool:
    return value.isdigit() and len(value) <= 7


def _front_end(value: str) -> bool:
    repo, _, version = value.partition("@")
    return (repo in ("Comfy-Org/ComfyUI_frontend", "Comfy-Org/ComfyUI_legacy_frontend")
            and bool(version) and all(c.isalnum() or c in "._-" for c in version))


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

ALLOWED_FLAGS = {
    # memory and device placement
    "--cpu": None, "--gpu-only": None, "--highvram": None, "--normalvram": None, "--lowvram": None,
    "--novram": None, "--reserve-vram": _number, "--disable-smart-memory": None, "--cpu-vae": None,
    "--cuda-malloc": None, "--disable-cuda-malloc": None, "--async-offload": None,
    "--disable-mmap": None, "--mmap-torch-files": None, "--force-channels-last": None,
    "--disable-ipex-optimize": None, "--supports-fp8-compute": None, "--disable-async-offload": None,
    "--vram-headroom": _number, "--disable-dynamic-vram": None, "--enable-dynamic-vram": None,
    "--disable-pinned-memory": None, "--fast-disk": None, "--disable-fast-disk": None,
    # precision
    "--force-fp32": None, "--force-fp16": None, "--fp32-unet": None, "--fp64-unet": None, "--bf16-unet": None,
    "--fp16-unet": None, "--fp8_e4m3fn-unet": None, "--fp8_e5m2-unet": None, "--fp8_e8m0fnu-unet": None,
    "--fp16-vae": None, "--fp32-vae": None, "--bf16-vae": None, "--fp8_e4m3fn-text-enc": None,
    "--fp8_e5m2-text-enc": None, "--fp16-text-enc": None, "--fp32-text-enc": None, "--bf16-text-enc": None,
    # attention
    "--use-split-cross-attention": None, "--use-quad-cross-attention": None,
    "--use-pytorch-cross-attention": None, "--use-sage-attention": None, "--use-flash-attention": None,
    "--use-ck-attention": None, "--disable-xformers": None, "--force-upcast-attention": None,
    "--dont-upcast-attention": None,
    # speed, caching, previews
    "--deterministic": None, "--fast": _word, "--cache-classic": None, "--cache-none": None, "--cache-ram": _number,
    "--cache-lru": _whole, "--preview-method": _word, "--preview-size": _whole,
    "--default-hashing-function": lambda v: v in ("md5", "sha1", "sha256", "sha512"),
    # output and logging
    "--disable-metadata": None, "--dont-print-server": None, "--disable-auto-launch": None,
    "--enable-compress-response-body": None, "--verbose": lambda v: v in _LEVELS, "--log-stdout": None,
    "--disable-api-nodes": None,
    # the assets system off (a worker needs no asset catalogue)
    "--disable-assets": None,
    # the official frontends only
    "--front-end-version": _front_end,
}
OPTIONAL_VALUE = {"--verbose"}
MANY_VALUES = {"--fast", "--cache-ram"}
MOST_VALUES = {"--cache-ram": 2}
# refused flags whose reason the generic message does not give
REFUSED_BECAUSE = {
    "--database-url": "it names a file for ComfyUI to create and write, anywhere the server may write; the "
                      "launcher and the panel's Start give each local worker a database of its own already",
}


def extra_args_errors(value: str, flags: ComfyFlags | None = None) -> list[str]:
    """Why these extra_args may not come through the HTTP API ([] when they may), for an instance
    of the ComfyUI whose ``flags`` are given (None: one whose flags are unknown, such as a remote worker)."""
    try:
        words = shlex.split(value)
    except ValueError as exc:
        return [f"cannot be split into words ({exc})"]
    errors: list[str] = []
    refused: list[str] = []
    lacking: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, has_inline, inline = word.partition("=")
        i += 1
        if name not in ALLOWED_FLAGS:
            refused.append(word)
            while word.startswith("-") and not has_inline and i < len(words) and not words[i].startswith("-"):
                i += 1  # its value, if it takes one: named with the flag
            continue
        if flags is not None and flags.lacks(name):
            lacking.append(name)
        check = ALLOWED_FLAGS[name]
        values = [inline] if has_inline else []
        if check is not None and not has_inline:
            while i < len(words) and not words[i].startswith("-"):
                values.append(words[i])
                i += 1
                if name not in MANY_VALUES:
                    break
        errors.extend(_value_errors(name, check, values))
    if lacking:
        errors.insert(0, f"{', '.join(lacking)}: not a flag of {flags.where}, which would exit at start when given "
                         "it (removed or renamed in that version, or newer than it); remove it, or see "
                         "'python main.py --help' in that folder for the flags it takes")
    if refused:
        reasons = "".join(f"; {name}: {REFUSED_BECAUSE[name]}" for name in
                          dict.fromkeys(w.partition("=")[0] for w in refused) if name in REFUSED_BECAUSE)
        errors.insert(0, f"{', '.join(refused)}: not allowed through the HTTP API, which takes only flags "
                         "that tune memory, precision, attention, caching, previews and logging, such as "
                         "--lowvram (the list is ALLOWED_FLAGS in distributed_core/access.py). Flags that widen "
                         "access, name files or folders, or load code can only be written into the config file "
                         "by hand, on the master's machine" + reasons)
    return errors


def _value_errors(name: str, check, values: list[str]) -> list[str]:
    if check is None:
        return [f"{name} takes no value, got {values[0]!r}"] if values else []
    if not values and name not in OPTIONAL_VALUE | MANY_VALUES:
        return [f"{name} needs a value"]
    if len(values) > MOST_VALUES.get(name, len(values)):
        return [f"{name} takes at most {MOST_VALUES[name]} values, got {len(values)}"]
    errors = []
    for v in values:
        if v.startswith("-"):
            errors.append(f"{name}: {v!r} starts with '-', so ComfyUI could take it for a flag; no accepted "
                          "value does (give the flag and its value as in --reserve-vram 1.5)")
        elif not check(v):
            errors.append(f"{name}: {v!r} is not an accepted value")
    return errors


def changed_extra_args_errors(old, new, local_flags: ComfyFlags | None = None) -> list[str]:
    """Errors for extra_args that a change through the HTTP API sets, from Config ``old`` to ``new``;
    ``local_flags`` are those of the master's ComfyUI, which its local workers run too.

    A value the file already holds for the same instance (the master, or a worker of the same id)
    passes as it is, so saving the panel's settings never trips over flags written by hand."""
    before = {"master": old.master.extra_args, **{f"worker:{w.id}": w.extra_args for w in old.workers},
              "ray": old.ray.extra_args if old.ray else ""}
    errors = []
    items = [("master", "master", new.master.extra_args, local_flags)] + [
        (f"worker:{w.id}", f"workers[{i}]", w.extra_args, local_flags if w.is_local else None)
        for i, w in enumerate(new.workers)]
    if new.ray is not None:  # Ray workers run the nodes' ComfyUI: the allow-list alone applies
        items.append(("ray", "ray", new.ray.extra_args, None))
    for key, where, value, flags in items:
        if value and value != before.get(key):
            errors.extend(f"{where}.extra_args: {e}" for e in extra_args_errors(value, flags))
    return errors


def parses_as_origin(origin: str) -> bool:
    """Whether an Origin header can be read at all ("null" can: browsers send it for opaque origins)."""
    if origin == "null":
        return True
    try:
        parts = urlsplit(origin)
        parts.port  # raises on a port that is not a number
    except ValueError:
        return False
    return bool(parts.scheme and parts.netloc)
