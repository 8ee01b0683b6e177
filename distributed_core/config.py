"""gpu_config.json: the schema, validation with messages that name the field, and safe loading and saving.

Where the settings live:
- ``gpu_config.json`` (tracked by git) holds the shipped defaults in the product sheet's shape;
- ``gpu_config.local.json`` (ignored by git) holds the user's own settings once anything is saved,
  so ``git pull`` never conflicts with them and never loses them;
- ``COMFYUI_DISTRIBUTED_CONFIG`` names another file instead (the launcher's ``--config`` sets it).
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import cpus as cpus_module

EXTENSION_DIR = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = EXTENSION_DIR / "gpu_config.json"
LOCAL_FILE = EXTENSION_DIR / "gpu_config.local.json"
ENV_VAR = "COMFYUI_DISTRIBUTED_CONFIG"

MODES = ("parallel", "staggered")
TRANSPORTS = ("auto", "float32", "uint8", "png")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
MAX_WORKERS = 256
HIDDEN = "(hidden)"  # a header value as the panel and GET /distributed/config show it
MAX_HEADERS = 16
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")

DEFAULT_CONFIG: dict[str, Any] = {
    "master": {"port": 8188, "device": 0, "enabled": True},
    "workers": [],
    "settings": {"stagger_delay": 2.0, "job_timeout": 120, "mode": "parallel", "transport": "auto",
                 "spread_queue": False},
}


class ConfigError(ValueError):
    """The config is invalid; ``errors`` lists one message per bad field."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class Master:
    port: int = 8188
    device: int | None = 0
    enabled: bool = True
    extra_args: str = ""  # the launcher's extra ComfyUI arguments for the master
    cpus: str = ""        # CPU cores for the launcher to pin it to: "" automatic, "off", or "0-7,16-23"
    threads: int = 0      # its thread pools' size: 0 means one per core it is given


@dataclass
class Worker:
    id: str
    port: int
    device: int | None = None
    enabled: bool = True
    extra_args: str = ""
    host: str = "127.0.0.1"
    name: str = ""
    cpus: str = ""        # as Master.cpus
    threads: int = 0      # as Master.threads
    # An address of its own (http or https, a path prefix for reverse proxies) in place of host and
    # port; such a worker is never started by the launcher. ca_bundle: a CA file to verify its https
    # certificate with (the system's CAs otherwise); headers: sent with every request to it (a
    # proxy's token), never logged or shown.
    address: str = ""
    ca_bundle: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        if self.address:
            return self.address
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def on_this_machine(self) -> bool:
        """Its host is this machine (a worker by url may be a proxy here in front of one)."""
        return self.host in LOCAL_HOSTS

    @property
    def is_local(self) -> bool:
        """A ComfyUI on this machine at host:port, which the launcher and the panel start."""
        return not self.address and self.on_this_machine

    @property
    def label(self) -> str:
        return self.name or self.id


@dataclass
class Settings:
    stagger_delay: float = 2.0
    job_timeout: float = 120.0
    mode: str = "parallel"
    # How workers send images: float32 (lossless), uint8 (what a PNG keeps, a quarter of the bytes),
    # png (compact, for slow links); auto is float32 on this machine and uint8 across a network.
    transport: str = "auto"
    # Prompts without a Collector are rendered whole, each by one participant (distributed_core/spread.py).
    spread_queue: bool = False

    def transport_for(self, worker: "Worker") -> str:
        if self.transport != "auto":
            return self.transport
        return "float32" if worker.on_this_machine else "uint8"


@dataclass
class RaySettings:
    """Workers that a Ray cluster places and restarts (ray_workers.py): one ComfyUI per GPU."""
    address: str = "auto"   # "auto" (the cluster this machine is part of), host:port, or ray://host:port
    workers: int = 0        # how many; 0 means one per GPU of the cluster
    comfyui: str = ""       # the ComfyUI folder on the nodes; "" means the master's own folder's path
    extra_args: str = ""    # their ComfyUI arguments (through the panel: the same allow-list as workers')


@dataclass
class Config:
    master: Master = field(default_factory=Master)
    workers: list[Worker] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    ray: RaySettings | None = None

    def worker(self, worker_id: str) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    def to_dict(self) -> dict[str, Any]:
        master: dict[str, Any] = {"port": self.master.port, "device": self.master.device,
                                  "enabled": self.master.enabled}
        if self.master.extra_args:
            master["extra_args"] = self.master.extra_args
        ray = {} if self.ray is None else {"ray": {"address": self.ray.address, "workers": self.ray.workers,
                                                   **({"comfyui": self.ray.comfyui} if self.ray.comfyui else {}),
                                                   **({"extra_args": self.ray.extra_args}
                                                      if self.ray.extra_args else {})}}
        return {
            **ray,
            "master": {**master, **_cpu_fields(self.master)},
            "workers": [
                {"id": w.id, "name": w.name, **({} if w.address else {"host": w.host, "port": w.port}),
                 "device": w.device, "enabled": w.enabled, "extra_args": w.extra_args, **_cpu_fields(w),
                 **_address_fields(w)}
                for w in self.workers
            ],
            "settings": {"stagger_delay": self.settings.stagger_delay,
                         "job_timeout": self.settings.job_timeout, "mode": self.settings.mode,
                         "transport": self.settings.transport,
                         "spread_queue": self.settings.spread_queue},
        }


def _cpu_fields(instance: Master | Worker) -> dict[str, Any]:
    """Written only when set, so that a config without overrides stays as short as it was."""
    return {**({"cpus": instance.cpus} if instance.cpus else {}),
            **({"threads": instance.threads} if instance.threads else {})}


def _address_fields(worker: Worker) -> dict[str, Any]:
    """Written only when set: a worker by URL, its CA file and its headers (in clear, in the file
    only; see public_dict)."""
    return {**({"url": worker.address} if worker.address else {}),
            **({"ca_bundle": worker.ca_bundle} if worker.ca_bundle else {}),
            **({"headers": dict(worker.headers)} if worker.headers else {})}


def public_dict(config: Config) -> dict[str, Any]:
    """The config as the panel and GET /distributed/config show it: header values hidden."""
    data = config.to_dict()
    for worker in data["workers"]:
        if "headers" in worker:
            worker["headers"] = {name: HIDDEN for name in worker["headers"]}
    return data


def keep_hidden(new: dict[str, Any], old: Config) -> dict[str, Any]:
    """A config posted back by the panel: each header value it shows as hidden takes the value
    that the same worker's header has now (a header it does not name is dropped)."""
    if not isinstance(new, dict) or not isinstance(new.get("workers"), list):
        return new
    for worker in new["workers"]:
        headers = worker.get("headers") if isinstance(worker, dict) else None
        if not isinstance(headers, dict):
            continue
        before = old.worker(worker.get("id")) if isinstance(worker.get("id"), str) else None
        for name, value in list(headers.items()):
            if value == HIDDEN:
                kept = before.headers.get(name) if before is not None else None
                if kept is None:
                    headers.pop(name)
                else:
                    headers[name] = kept
    return new


# --- validation -------------------------------------------------------------------------------

def _shown(value: Any) -> str:
    """A value as JSON for an error message; one nested too deeply to write back is only described."""
    try:
        return json.dumps(value)
    except RecursionError:
        return "a value nested too deeply to show"


def _check_keys(obj: dict, allowed: set[str], where: str, errors: list[str]) -> None:
    for key in obj:
        if key not in allowed:
            errors.append(f"{where}.{key}: unknown field (allowed: {', '.join(sorted(allowed))})")


def _int(obj: dict, key: str, where: str, errors: list[str], default, lo: int, hi: int, nullable=False):
    value = obj.get(key, default)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        errors.append(f"{where}.{key}: must be a whole number from {lo} to {hi}"
                      + (" or null" if nullable else "") + f", got {_shown(value)}")
        return default
    return value


def _number(obj: dict, key: str, where: str, errors: list[str], default: float, lo: float, hi: float):
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        errors.append(f"{where}.{key}: must be a number from {lo:g} to {hi:g}, got {_shown(value)}")
        return default
    return float(value)


def _bool(obj: dict, key: str, where: str, errors: list[str], default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        errors.append(f"{where}.{key}: must be true or false, got {_shown(value)}")
        return default
    return value


def _str(obj: dict, key: str, where: str, errors: list[str], default: str, max_len: int = 200) -> str:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > max_len or any(ord(c) < 32 for c in value):
        errors.append(f"{where}.{key}: must be text of at most {max_len} characters on one line")
        return default
    return value


_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:_")
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _host(obj: dict, key: str, where: str, errors: list[str], default: str) -> str:
    value = _str(obj, key, where, errors, default, max_len=253)
    if value and not set(value) <= _HOST_CHARS:
        errors.append(f"{where}.{key}: must be a host name or IP address, got {_shown(value)}")
        return default
    return value


def _address(obj: dict, where: str, errors: list[str]) -> str:
    """A worker's own address: http(s)://host[:port][/path prefix], without credentials, query or
    fragment; "" where none is given (host and port then say where it is)."""
    value = _str(obj, "url", where, errors, "", max_len=2000).strip()
    if not value:
        return ""
    try:
        split = urlsplit(value)
        split.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        split = None
    problem = ""
    if split is None or split.scheme not in ("http", "https") or not split.hostname:
        problem = "must be an http:// or https:// address such as https://pod-8188.proxy.example.net"
    elif split.username or split.password:
        problem = "must not carry a user name or password; put a proxy's credentials in headers"
    elif split.query or split.fragment:
        problem = "must not have a query or fragment (a path prefix such as /comfy is fine)"
    elif not set(split.hostname) <= _HOST_CHARS:
        problem = "has a host name that is not one"
    elif "host" in obj or "port" in obj:
        problem = "give either url or host and port, not both"
    if problem:
        errors.append(f"{where}.url: {problem}, got {_shown(value)}")
        return ""
    return value.rstrip("/")


def _headers(obj: dict, where: str, errors: list[str]) -> dict[str, str]:
    value = obj.get("headers", {})
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_HEADERS:
        errors.append(f"{where}.headers: must be an object of at most {MAX_HEADERS} header names and values")
        return {}
    headers = {}
    for name, text in value.items():
        if not _HEADER_NAME.fullmatch(name) or name.lower() in ("host", "content-length", "transfer-encoding"):
            errors.append(f"{where}.headers: {_shown(name)} is not a header name that may be set here")
        elif not isinstance(text, str) or len(text) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in text):
            errors.append(f"{where}.headers.{name}: must be text of at most 4096 characters on one line")
        else:
            headers[name] = text
    return headers


def _extra_args(obj: dict, where: str, errors: list[str]) -> str:
    value = _str(obj, "extra_args", where, errors, "", max_len=1000)
    # Arguments never pass through a shell, but refuse what only makes sense to one: it is
    # either a mistake or an attempt to run something else.
    bad = sorted({c for c in value if c in ";|&`$<>\\\"'(){}*?!#\n"})
    if bad:
        errors.append(f"{where}.extra_args: shell characters are not allowed ({' '.join(bad)}); "
                      "give plain ComfyUI arguments such as --lowvram")
        return ""
    return value


def _cpus(obj: dict, where: str, errors: list[str]) -> str:
    value = _str(obj, "cpus", where, errors, "", max_len=1000).strip()
    if value in ("", cpus_module.OFF):
        return value
    try:
        cpus_module.parse_cpulist(value)
    except cpus_module.CpuListError as exc:
        errors.append(f"{where}.cpus: {exc}; leave it out to split the cores automatically, "
                      f"or write \"{cpus_module.OFF}\" to pin nothing")
        return ""
    return value


def parse(data: Any) -> Config:
    """Validate a JSON value and build a Config; raise ConfigError naming every bad field."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(["config: must be a JSON object with master, workers and settings"])
    _check_keys(data, {"master", "workers", "settings", "ray"}, "config", errors)

    m = data.get("master", {})
    if not isinstance(m, dict):
        errors.append("master: must be an object")
        m = {}
    # "host" was where workers reached the master back; they never do now (relay.py): it is read
    # and dropped, so that a config from before still loads, and the next save leaves it out
    _check_keys(m, {"port", "device", "enabled", "host", "extra_args", "cpus", "threads"}, "master", errors)
    master = Master(port=_int(m, "port", "master", errors, 8188, 1, 65535),
                    device=_int(m, "device", "master", errors, 0, 0, 1023, nullable=True),
                    enabled=_bool(m, "enabled", "master", errors, True),
                    extra_args=_extra_args(m, "master", errors),
                    cpus=_cpus(m, "master", errors), threads=_int(m, "threads", "master", errors, 0, 0, 4096))

    raw_workers = data.get("workers", [])
    if not isinstance(raw_workers, list):
        errors.append("workers: must be a list")
        raw_workers = []
    if len(raw_workers) > MAX_WORKERS:
        errors.append(f"workers: at most {MAX_WORKERS} workers")
        raw_workers = raw_workers[:MAX_WORKERS]
    workers: list[Worker] = []
    for i, w in enumerate(raw_workers):
        where = f"workers[{i}]"
        if not isinstance(w, dict):
            errors.append(f"{where}: must be an object")
            continue
        _check_keys(w, {"id", "name", "host", "port", "device", "enabled", "extra_args", "cpus", "threads",
                        "url", "ca_bundle", "headers"}, where, errors)
        worker_id = _str(w, "id", where, errors, "", max_len=64) or f"worker{i + 1}"
        if not set(worker_id) <= _ID_CHARS:
            errors.append(f"{where}.id: use letters, digits, '-' and '_' only")
        address = _address(w, where, errors)
        split = urlsplit(address) if address else None
        workers.append(Worker(
            id=worker_id,
            port=split.port or (443 if split.scheme == "https" else 80) if split else
            _int(w, "port", where, errors, 8189, 1, 65535),
            device=_int(w, "device", where, errors, None, 0, 1023, nullable=True),
            enabled=_bool(w, "enabled", where, errors, True),
            extra_args=_extra_args(w, where, errors),
            host=split.hostname if split else _host(w, "host", where, errors, "127.0.0.1") or "127.0.0.1",
            name=_str(w, "name", where, errors, "", max_len=64),
            cpus=_cpus(w, where, errors),
            threads=_int(w, "threads", where, errors, 0, 0, 4096),
            address=address,
            ca_bundle=_str(w, "ca_bundle", where, errors, "", max_len=4096),
            headers=_headers(w, where, errors),
        ))

    s = data.get("settings", {})
    if not isinstance(s, dict):
        errors.append("settings: must be an object")
        s = {}
    _check_keys(s, {"stagger_delay", "job_timeout", "mode", "transport", "spread_queue"}, "settings", errors)
    mode = s.get("mode", "parallel")
    if mode not in MODES:
        errors.append(f"settings.mode: must be one of {', '.join(MODES)}, got {_shown(mode)}")
        mode = "parallel"
    transport = s.get("transport", "auto")
    if transport not in TRANSPORTS:
        errors.append(f"settings.transport: must be one of {', '.join(TRANSPORTS)}, got {_shown(transport)}")
        transport = "auto"
    settings = Settings(stagger_delay=_number(s, "stagger_delay", "settings", errors, 2.0, 0, 600),
                        job_timeout=_number(s, "job_timeout", "settings", errors, 120, 1, 86400),
                        mode=mode, transport=transport,
                        spread_queue=_bool(s, "spread_queue", "settings", errors, False))

    seen_ids: set[str] = set()
    seen_addresses = {("127.0.0.1", master.port)}
    for i, w in enumerate(workers):
        if w.id in seen_ids:
            errors.append(f"workers[{i}].id: {w.id!r} is used by another worker")
        seen_ids.add(w.id)
        address = w.url if w.address else ("127.0.0.1" if w.is_local else w.host, w.port)
        if address in seen_addresses:
            errors.append(f"workers[{i}].port: {w.port} on {w.host} is already used by the master "
                          "or another worker")
        seen_addresses.add(address)
    ray = _ray(data.get("ray"), errors)
    if ray is not None and any(w.id.startswith(RAY_ID_PREFIX) for w in workers):
        errors.append(f"workers: ids starting with {RAY_ID_PREFIX!r} are the Ray workers' own")
    if errors:
        raise ConfigError(errors)
    return Config(master=master, workers=workers, settings=settings, ray=ray)


RAY_ID_PREFIX = "ray-"                          # the ids of Ray workers (ray_workers.py)
RAY_WORKER_ENV = "COMFYUI_DISTRIBUTED_RAY_WORKER"  # set in the ComfyUI that a Ray actor starts


def _ray(r: Any, errors: list[str]) -> RaySettings | None:
    if r is None:
        return None
    if not isinstance(r, dict):
        errors.append("ray: must be an object, such as {\"address\": \"auto\", \"workers\": 2}")
        return None
    _check_keys(r, {"address", "workers", "comfyui", "extra_args"}, "ray", errors)
    address = _str(r, "address", "ray", errors, "auto")
    if address != "auto" and not (address.startswith("ray://") or ":" in address):
        errors.append(f"ray.address: must be auto, host:port or ray://host:port, got {_shown(address)}")
    return RaySettings(address=address, workers=_int(r, "workers", "ray", errors, 0, 0, 1024),
                       comfyui=_str(r, "comfyui", "ray", errors, "", max_len=1000),
                       extra_args=_extra_args(r, "ray", errors))


# --- files ------------------------------------------------------------------------------------

def config_path() -> Path:
    """The file settings are read from and saved to."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return LOCAL_FILE if LOCAL_FILE.exists() else DEFAULTS_FILE


def save_path() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else LOCAL_FILE


@dataclass
class Loaded:
    config: Config
    path: Path
    error: str = ""  # non-empty when the file was unusable and defaults are in force


NESTED_TOO_DEEPLY = ("the file is nested too deeply to be a config (a config is an object of objects and lists, "
                     "a few levels deep); fix it, or save settings from the Distributed panel to replace it")


def read(path: Path) -> Config:
    """The config in a file; raises ConfigError saying why the file cannot be used."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot be read ({exc})"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"]) from None
    except RecursionError:
        raise ConfigError([NESTED_TOO_DEEPLY]) from None
    return parse(data)


def load(path: Path | None = None) -> Loaded:
    """Read the config. A missing or broken file never raises: defaults apply and ``error`` says why."""
    path = path or config_path()
    if not path.exists():
        return Loaded(parse(copy.deepcopy(DEFAULT_CONFIG)), path)
    try:
        return Loaded(read(path), path)
    except ConfigError as exc:
        return Loaded(parse(copy.deepcopy(DEFAULT_CONFIG)), path, f"{path}: " + "; ".join(exc.errors))


def _keep_broken(path: Path) -> Path:
    """Keep a broken config beside itself as ``<name>.broken-<time>[-n]``; never over an earlier copy."""
    stamp = int(time.time())
    for n in range(1000):
        aside = path.with_name(f"{path.name}.broken-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.link(path, aside)  # fails if that name is taken, so two copies never overwrite each other
            return aside
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: copy, again never over an existing file
            try:
                with open(aside, "xb") as handle:
                    handle.write(path.read_bytes())
                return aside
            except FileExistsError:
                continue
    raise OSError(f"cannot keep the broken {path} aside: too many .broken- copies; remove old ones")


def save(config: Config, path: Path | None = None) -> Path:
    """Write atomically: a crash mid-write leaves either the old file or the new one, never a mix.

    A file that is currently broken is kept beside the new one (``.broken-<time>``) rather than lost.
    When the config is a symbolic link, the file it points to is written and the link stays.
    """
    path = path or save_path()
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = None
    if target.exists():
        try:
            mode = target.stat().st_mode & 0o777
            read(target)
        except (ConfigError, OSError):
            _keep_broken(target)
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # as the file it replaces
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def new_worker_id(config: Config) -> str:
    taken = {w.id for w in config.workers}
    n = len(config.workers) + 1
    while f"worker{n}" in taken:
        n += 1
    return f"worker{n}"
