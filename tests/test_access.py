"""Access to the extension's routes and what they accept, against a real ComfyUI master on loopback:
request bodies that arrive in pieces, headers no browser sends, and ComfyUI flags through the API.
(Requests from another machine are in test_remote.py; the rules on plain values in test_core.py.)"""
from __future__ import annotations

import json
import socket
import time

import pytest
import requests

pytestmark = pytest.mark.timeout(300)


def raw_request(url: str, head: bytes, body_parts: list[bytes] = (), pause: float = 0.0) -> tuple[int, dict]:
    """Send a request exactly as given, the body in separate TCP writes with a pause between them;
    returns the status and the JSON answer."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        for part in body_parts:
            time.sleep(pause)
            sock.sendall(part)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _headers, _, payload = rest.partition(b"\r\n\r\n")
    status = int(status_line.split()[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, {"raw": payload.decode("latin-1")}


def head(method: str, path: str, url: str, headers: dict[str, bytes], length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + url.split("//", 1)[1].encode(), b"Connection: close"]
    if length is not None:
        lines += [b"Content-Type: application/json", f"Content-Length: {length}".encode()]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_a_config_that_arrives_in_two_tcp_writes_is_read_whole(live):
    config = live.default_config()
    config["workers"] += [{"id": f"pad{i}", "name": "x" * 60, "port": 20000 + i, "enabled": False,
                           "extra_args": "--lowvram"} for i in range(40)]
    config["settings"]["mode"] = "staggered"
    body = json.dumps(config).encode()
    assert len(body) > 4000
    secret = live.master.auth()["X-Distributed-Secret"].encode()
    request = head("POST", "/distributed/config", live.master.url, {"X-Distributed-Secret": secret}, len(body))
    status, answer = raw_request(live.master.url, request, [body[:1400], body[1400:]], pause=0.5)
    assert status == 200, answer
    on_disk = json.loads(live.config_path.read_text())
    assert len(on_disk["workers"]) == 42 and on_disk["settings"]["mode"] == "staggered"


@pytest.mark.parametrize("with_secret", [False, True])
@pytest.mark.parametrize("method, path", [("POST", "/distributed/config"), ("GET", "/distributed/secret"),
                                          ("GET", "/distributed/status")])
def test_an_origin_that_cannot_be_read_is_a_bad_request(live, with_secret, method, path):
    headers = {"Origin": b"http://[", "Sec-Fetch-Site": b"same-origin"}
    if with_secret:
        headers["X-Distributed-Secret"] = live.master.auth()["X-Distributed-Secret"].encode()
    before = live.config_path.read_text()
    status, answer = raw_request(live.master.url, head(method, path, live.master.url, headers,
                                                       2 if method == "POST" else None), [b"{}"] if method == "POST" else [])
    assert status == 400, answer
    assert "Origin" in answer["error"] and "http://[" in answer["error"]
    assert live.config_path.read_text() == before


def test_a_secret_header_that_is_not_utf8_is_refused(live):
    secret = live.master.auth()["X-Distributed-Secret"].encode()
    for value in (b"\xff\xfe" + secret[2:], secret + b"\xc3", b"\x80" * 40):
        status, answer = raw_request(live.master.url, head("POST", "/distributed/config", live.master.url,
                                                           {"X-Distributed-Secret": value}, 2), [b"{}"])
        assert status == 403 and "X-Distributed-Secret" in answer["error"], (value, status, answer)
    assert live.master.get("/system_stats").status_code == 200


def test_a_config_file_nested_too_deeply_falls_back_to_defaults_and_the_panel_repairs_it(live):
    from harness import error_of, image_workflow
    live.config_path.write_text("[" * 100_000 + "]" * 100_000)
    shown = live.master.get("/distributed/config")
    assert shown.status_code == 200, shown.text
    assert "nested too deeply" in shown.json()["error"] and shown.json()["config"]["workers"] == []
    status = live.master.get("/distributed/status", timeout=30)
    assert status.status_code == 200 and "nested too deeply" in status.json()["config_error"], status.text
    entry = live.master.wait_prompt(live.master.queue_prompt(image_workflow(seed=5, batch=1)), 120)
    assert error_of(entry) == ""  # the Collector runs on the defaults: the master alone
    repaired = live.master.post("/distributed/config", live.default_config())
    assert repaired.status_code == 200, repaired.text
    assert live.master.get("/distributed/config").json()["error"] == ""
    assert len(json.loads(live.config_path.read_text())["workers"]) == len(live.workers)
    assert list(live.config_path.parent.glob(live.config_path.name + ".broken-*"))


# --- ComfyUI flags through the API -------------------------------------------------------------------

# each of these was shown to open a worker to the network, expose files or run uploaded code
DANGEROUS = ["--listen 0.0.0.0 --input-directory /", "--extra-model-paths-config /tmp/x.yaml", "--enable-cors",
             "--enable-cors-header http://evil.example", "--lowvram --front-end-root /", "--base-dir /", "--whitelist-custom-nodes x",
             "--listen=0.0.0.0", "--tls-keyfile k --tls-certfile c", "--port 1"]


@pytest.mark.parametrize("args", DANGEROUS)
def test_flags_that_widen_access_or_expose_files_are_refused_through_the_api(live, args):
    before = live.config_path.read_text()
    flag = args.split()[0] if not args.startswith("--lowvram") else "--front-end-root"
    added = live.master.post("/distributed/workers", {"host": "127.0.0.1", "port": 9990, "extra_args": args})
    assert added.status_code == 400, added.text
    assert flag in added.json()["error"] and "by hand" in added.json()["error"]
    edited = live.master.request("PATCH", "/distributed/workers/worker1", {"extra_args": args})
    assert edited.status_code == 400 and flag in edited.json()["error"], edited.text
    config = live.default_config()
    config["master"]["extra_args"] = args
    posted = live.master.post("/distributed/config", config)
    assert posted.status_code == 400 and "master.extra_args" in posted.json()["error"], posted.text
    assert live.config_path.read_text() == before


def declared(tree, flag: str) -> bool:
    return f'"{flag}"' in (tree / "comfy" / "cli_args.py").read_text(encoding="utf-8")


def test_flags_that_only_tune_comfyui_are_accepted_through_the_api(live):
    args = " ".join(a for a in ("--lowvram", "--reserve-vram 1.5", "--preview-method auto")
                    if declared(live.tree, a.split()[0]))
    assert args.startswith("--lowvram --") and args.endswith("--preview-method auto")
    resp = live.master.post("/distributed/workers", {"host": "127.0.0.1", "port": 9990, "extra_args": args})
    assert resp.status_code == 200, resp.text
    assert resp.json()["worker"]["extra_args"] == args


def test_flags_the_masters_comfyui_lacks_are_refused_for_its_local_instances(live):
    """The ComfyUI under test (March 2024 or 0.3.64) lacks flags of the list that 0.38 added; a
    worker given one would exit at start. A remote worker runs a ComfyUI the master cannot read."""
    lacking = [f for f in ("--disable-assets", "--use-ck-attention", "--vram-headroom 1", "--normalvram")
               if not declared(live.tree, f.split()[0])]
    assert lacking
    before = live.config_path.read_text()
    for args in lacking:
        flag = args.split()[0]
        added = live.master.post("/distributed/workers", {"host": "127.0.0.1", "port": 9990, "extra_args": args})
        assert added.status_code == 400, added.text
        assert added.json()["error"].startswith(f"extra_args: {flag}: not a flag of ") and str(live.tree) in added.json()["error"]
        config = live.default_config()
        config["master"]["extra_args"] = args
        posted = live.master.post("/distributed/config", config)
        assert posted.status_code == 400 and f"master.extra_args: {flag}: not a flag of" in posted.json()["error"]
        assert live.config_path.read_text() == before
    remote = live.master.post("/distributed/workers", {"host": "10.0.0.5", "port": 9990, "extra_args": lacking[0]})
    assert remote.status_code == 200, remote.text


@pytest.mark.parametrize("args", ["--fast=--listen", "--verbose=--enable-cors-header", "--preview-method=-x"])
def test_a_value_that_looks_like_a_flag_is_refused_through_the_api(live, args):
    resp = live.master.post("/distributed/workers", {"host": "10.0.0.5", "port": 9990, "extra_args": args})
    assert resp.status_code == 400 and "starts with '-'" in resp.json()["error"], resp.text


def test_a_database_url_is_refused_through_the_api_but_kept_when_written_by_hand(live):
    resp = live.master.request("PATCH", "/distributed/workers/worker1", {"extra_args": "--database-url sqlite:////tmp/x.db"})
    assert resp.status_code == 400 and "names a file for ComfyUI to create and write" in resp.json()["error"], resp.text
    config = live.default_config()
    config["workers"][0]["extra_args"] = "--database-url sqlite:////tmp/own.db"
    live.reset_config(config)
    assert live.master.request("PATCH", "/distributed/workers/worker1", {"name": "renamed"}).status_code == 200
    assert json.loads(live.config_path.read_text())["workers"][0]["extra_args"] == "--database-url sqlite:////tmp/own.db"


def test_flags_written_by_hand_survive_saves_from_the_panel(live):
    config = live.default_config()
    config["workers"][0]["extra_args"] = "--output-directory /tmp/elsewhere"  # the user's own file
    live.reset_config(config)
    config["settings"]["mode"] = "staggered"
    assert live.master.post("/distributed/config", config).status_code == 200
    assert live.master.request("PATCH", "/distributed/workers/worker1", {"name": "renamed"}).status_code == 200
    saved = json.loads(live.config_path.read_text())
    assert saved["workers"][0]["extra_args"] == "--output-directory /tmp/elsewhere"
    assert saved["settings"]["mode"] == "staggered" and saved["workers"][0]["name"] == "renamed"
    # ... but the API cannot hand them to another worker
    config["workers"][1]["extra_args"] = "--output-directory /tmp/elsewhere"
    resp = live.master.post("/distributed/config", config)
    assert resp.status_code == 400 and "workers[1].extra_args: --output-directory" in resp.json()["error"]


def test_a_browser_page_of_the_master_itself_still_works(live):
    """The panel's own requests: same-origin headers, Host and Origin of the master, from this machine."""
    page = {"Sec-Fetch-Site": "same-origin", "Origin": live.master.url}
    resp = requests.post(live.master.url + "/distributed/workers", json={"port": 9991}, headers=page, timeout=10)
    assert resp.status_code == 200, resp.text
    localhost = live.master.url.replace("127.0.0.1", "localhost")
    resp = requests.get(localhost + "/distributed/status", headers={"Sec-Fetch-Site": "same-origin"}, timeout=30)
    assert resp.status_code == 200, resp.text
