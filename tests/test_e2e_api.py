"""The master's HTTP API against a real ComfyUI: config and bad requests."""
from __future__ import annotations

import json

import pytest
import requests

from harness import image_workflow

pytestmark = pytest.mark.timeout(300)


def test_config_round_trip_through_the_api(live):
    body = live.master.get("/distributed/config").json()
    assert body["error"] == "" and body["path"] == str(live.config_path)
    config = body["config"]
    config["settings"]["mode"] = "staggered"
    config["workers"][1]["enabled"] = False
    resp = live.master.post("/distributed/config", config)
    assert resp.status_code == 200, resp.text
    on_disk = json.loads(live.config_path.read_text())
    assert on_disk["settings"]["mode"] == "staggered" and on_disk["workers"][1]["enabled"] is False


@pytest.mark.parametrize("body, expect", [
    ({"workers": [{"port": 70000}]}, "workers[0].port"),
    ({"settings": {"mode": "warp"}}, "settings.mode"),
    ({"workers": [{"port": 9000, "extra_args": "--cpu && curl evil"}]}, "workers[0].extra_args"),
    ([1, 2], "config:"),
])
def test_bad_config_is_refused_with_the_field_named(live, body, expect):
    before = live.config_path.read_text()
    resp = live.master.post("/distributed/config", body)
    assert resp.status_code == 400
    assert expect in resp.json()["error"]
    assert live.config_path.read_text() == before


def test_malformed_and_oversized_bodies_get_4xx(live):
    resp = requests.post(live.master.url + "/distributed/config", data=b"{not json", timeout=10,
                         headers=live.master.auth())
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]
    resp = requests.post(live.master.url + "/distributed/config", data=b" " * (2 << 20), timeout=30,
                         headers=live.master.auth())
    assert resp.status_code == 413


def test_broken_config_file_keeps_comfyui_up(live):
    live.config_path.write_text("{ this is not json")
    body = live.master.get("/distributed/config").json()
    assert "not valid JSON" in body["error"]
    status = live.master.get("/distributed/status").json()
    assert "not valid JSON" in status["config_error"]
    assert live.config_path.read_text() == "{ this is not json"
    assert live.master.get("/system_stats").status_code == 200


def test_the_master_takes_no_results_over_http(live):
    """Work comes back only over the relays the master opens (distributed_core/relay.py): the old
    upload routes are gone, even for a client with the secret."""
    for path in ("/distributed/result", "/distributed/spread/result", "/distributed/tiles/result",
                 "/distributed/tiles/lease", "/distributed/tiles/image"):
        resp = requests.post(live.master.url + path, data=b"x", timeout=10, headers=live.master.auth())
        assert resp.status_code in (404, 405), (path, resp.status_code, resp.text[:200])


def _missing_input(prompt):
    del prompt["2"]["inputs"]["width"]  # a required input: ComfyUI's validation refuses with 400


def _unknown_node(prompt):
    prompt["9"] = {"class_type": "NoSuchNode", "inputs": {}}


def _refusal_status(tree, spoil) -> int:
    """ComfyUI's answer: 400 for a bad input; for an unknown node 400 since it looks node types up
    with .get (2024-08 on), 500 before that (a KeyError in its validation, as in the March 2024 one)."""
    if spoil is _unknown_node and "NODE_CLASS_MAPPINGS.get(" not in (tree / "execution.py").read_text():
        return 500
    return 400


@pytest.mark.parametrize("spoil", [_missing_input, _unknown_node])
def test_rejected_prompt_leaves_nothing_on_the_workers(live, spoil):
    prompt = image_workflow(seed=1, batch=1)
    spoil(prompt)
    before = [len(w.get("/history").json()) for w in live.workers]
    resp = live.master.post("/prompt", {"prompt": prompt})
    assert resp.status_code == _refusal_status(live.tree, spoil), resp.text
    import time
    time.sleep(1.5)
    assert [len(w.get("/history").json()) for w in live.workers] == before
    assert all(w.idle() for w in live.workers)
    assert live.master.get("/distributed/status").json()["jobs"] == []


def test_interrupt_reaches_every_instance(live):
    resp = live.master.post("/distributed/interrupt")
    assert resp.status_code == 200
    assert {r["id"] for r in resp.json()["results"] if r["ok"]} == {"master", "worker1", "worker2"}


def _strangers(url: str) -> list[dict]:
    port = url.rsplit(":", 1)[1]
    return [
        {},                                                   # a script without the secret
        {"X-Distributed-Secret": "guess"},                    # a wrong secret
        {"Origin": "http://evil.example"},                    # another web site, from a browser
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
        # a page of evil.example reached through DNS rebinding: its name resolves to this master, and
        # the browser's headers say same-origin, because for that page they are
        {"Host": f"evil.example:{port}", "Sec-Fetch-Site": "same-origin", "Origin": f"http://evil.example:{port}"},
        {"Host": f"evil.example:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Host": f"localhost.evil.example:{port}", "Origin": f"http://localhost.evil.example:{port}"},
    ]


GUARDED = [("POST", "/distributed/config"), ("POST", "/distributed/clear_vram"), ("POST", "/distributed/interrupt"),
           ("POST", "/distributed/workers"), ("PATCH", "/distributed/workers/worker1"),
           ("DELETE", "/distributed/workers/worker1"), ("POST", "/distributed/workers/worker1/start"),
           ("POST", "/distributed/workers/worker1/stop"), ("GET", "/distributed/workers/worker1/log"),
           ("GET", "/distributed/config"), ("GET", "/distributed/status"), ("GET", "/distributed/gpus"),
           ("GET", "/distributed/secret"), ("POST", "/api/distributed/config")]


@pytest.mark.parametrize("which", range(8))
def test_the_extensions_routes_refuse_strangers(live, which):
    headers = _strangers(live.master.url)[which]
    before = live.config_path.read_text()
    for method, path in GUARDED:
        resp = requests.request(method, live.master.url + path, json={"port": 9999}, headers=headers, timeout=10)
        # our check runs before ComfyUI's own (0.3.64 has one for some cross-site requests): one answer
        assert resp.status_code == 403, (method, path, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert ("only in a browser on the master's own machine" if path.endswith("/secret")
                else "X-Distributed-Secret") in error, error
    assert live.config_path.read_text() == before


def test_the_page_itself_and_secret_holders_are_let_in(live):
    config = live.master.get("/distributed/config").json()["config"]
    page = {"Origin": live.master.url, "Sec-Fetch-Site": "same-origin"}  # what a browser here sends
    assert requests.post(live.master.url + "/distributed/config", json=config, headers=page,
                         timeout=10).status_code == 200
    assert requests.post(live.master.url + "/distributed/config", json=config, headers={"Origin": live.master.url},
                         timeout=10).status_code == 200  # a browser without Fetch Metadata
    assert live.master.post("/distributed/config", config).status_code == 200  # sends the secret
    shown = requests.get(live.master.url + "/distributed/secret", headers={"Sec-Fetch-Site": "same-origin"},
                         timeout=10).json()
    assert {"X-Distributed-Secret": shown["secret"]} == live.master.auth()
    # ... but neither the secret nor a script is a browser: the secret is shown to browsers only
    assert requests.get(live.master.url + "/distributed/secret", timeout=10).status_code == 403
    assert requests.get(live.master.url + "/distributed/secret", headers=live.master.auth(), timeout=10).status_code == 403


def test_every_template_has_a_thumbnail_and_the_master_serves_both(live):
    """The templates dialog shows each template with the picture of the same name beside it (a 404
    each time the dialog opened, before the tiled upscale had one), titled by its name."""
    import harness
    folder = harness.REPO / "example_workflows"
    names = sorted(p.stem for p in folder.glob("*.json"))
    assert len(names) >= 3 and all((folder / f"{name}.jpg").is_file() for name in names), names
    # the dialog titles a custom node's template by its file name: each reads as a title
    assert all(name[0].isupper() and " - " in name and "_" not in name for name in names), names
    manager = live.tree / "app" / "custom_node_manager.py"
    if not (manager.exists() and "workflow_templates" in manager.read_text()):
        assert live.master.get("/api/workflow_templates").status_code == 404  # ComfyUI before mid-2024
        return
    listed = live.master.get("/api/workflow_templates").json()[harness.EXTENSION_NAME]
    assert sorted(listed) == names
    for name in names:
        for suffix in (".json", ".jpg"):
            resp = requests.get(f"{live.master.url}/api/workflow_templates/{harness.EXTENSION_NAME}/{name}{suffix}",
                                timeout=10)
            assert resp.status_code == 200 and resp.content == (folder / f"{name}{suffix}").read_bytes(), name
