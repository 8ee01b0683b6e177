"""A worker given by its own address: behind a real TLS reverse proxy (tests/tls_proxy.py) under a
path prefix, with a self-signed CA named in the config, on real servers. Every kind of job takes
it in; without the CA it is left out with the reason; a proxy that wants a header works once the
header is configured, and its value is never shown."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness import blue_values, error_of, image_workflow, wait_until
from test_e2e_spread import plain_workflow, renderers
from test_e2e_upscale import checkpoint, free_memory, log_since, log_size, sources, tallies, upscale_workflow  # noqa: F401
from tls_proxy import TlsProxy, make_certificates

pytestmark = pytest.mark.timeout(600)
TOKEN = "s3cret-proxy-token-7d1f"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def proxy(live, certificates):
    running = TlsProxy(live.workers[0].url, certificates["cert"], certificates["key"]).start()
    yield running
    running.stop()


def via_proxy(live, proxy, ca=None, headers=None, **settings) -> dict:
    """The config with worker1 given by the proxy's https address (and worker2 as it is)."""
    config = live.default_config(**settings)
    entry = {"id": "worker1", "name": "worker1", "url": proxy.url, "device": 1, "enabled": True}
    if ca is not None:
        entry["ca_bundle"] = str(ca)
    if headers:
        entry["headers"] = headers
    config["workers"][0] = entry
    live.reset_config(config)
    return config


def worker1_row(live) -> dict:
    rows = live.master.get("/distributed/status").json()["instances"]
    return next(r for r in rows if r["id"] == "worker1")


def wait_state(live, state: str) -> dict:
    return wait_until(lambda: (lambda row: row if row["state"] == state else None)(worker1_row(live)), 60,
                      interval=0.3, what=f"worker1 {state}")


def test_a_worker_behind_an_https_proxy_under_a_prefix_renders_its_share(live, proxy, certificates):
    via_proxy(live, proxy, ca=certificates["ca"])
    row = wait_state(live, "online")
    assert row["url"] == proxy.url and row["address"] == proxy.url
    prompt_id = live.master.queue_prompt(image_workflow(seed=100, batch=2))
    entry = live.master.wait_prompt(prompt_id, 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [100, 100, 101, 101, 102, 102]
    assert "/prompt" in proxy.seen_paths  # its share went through the proxy
    assert worker1_row(live)["port"] == proxy.port


def test_spread_prompts_and_a_tiled_upscale_use_the_worker_behind_the_proxy(live, proxy, certificates,
                                                                            checkpoint, sources):  # noqa: F811
    config = via_proxy(live, proxy, ca=certificates["ca"], spread_queue=True, job_timeout=60)
    config["workers"][1]["enabled"] = False  # worker1, through the proxy, is the only worker
    config["master"]["enabled"] = False
    live.reset_config(config)
    wait_state(live, "online")
    ids = [live.master.queue_prompt(plain_workflow(k, seconds=0.2)) for k in range(3)]
    for pid in ids:
        assert live.master.wait_prompt(pid, 120)["status"]["status_str"] == "success"
    assert set(renderers(live).values()) == {"worker1"}, renderers(live)

    config["settings"]["spread_queue"] = False
    config["master"]["enabled"] = True
    live.reset_config(config)
    start = log_size(live.master)
    try:
        prompt_id = live.master.queue_prompt(upscale_workflow(sources[:1]))
        entry = live.master.wait_prompt(prompt_id, 900)
    finally:
        free_memory(live)
    assert error_of(entry) == "", error_of(entry)
    assert np.stack(live.master.saved_images(entry, "6")).shape == (1, 128, 128, 3)
    [tally] = tallies(log_since(live.master, start))
    assert sum(tally.values()) == 9 and tally.get("worker1", 0) >= 1, tally


def test_without_its_ca_the_worker_is_left_out_with_the_reason(live, proxy):
    via_proxy(live, proxy)  # no ca_bundle: the system's CAs do not know the test CA
    row = wait_state(live, "offline")
    assert "certificate" in row["error"] and "ca_bundle" in row["error"], row["error"]
    prompt_id = live.master.queue_prompt(image_workflow(seed=100, batch=1))
    entry = live.master.wait_prompt(prompt_id, 120)
    assert error_of(entry) == ""  # its seed slot went to the others
    assert blue_values(live.master.saved_images(entry, "5")) == [100, 101, 102]
    assert "/prompt" not in proxy.seen_paths


def test_a_proxy_that_wants_a_header_works_once_it_is_configured_and_the_value_stays_hidden(
        live, proxy, certificates):
    proxy.required = ("X-Proxy-Token", TOKEN)
    via_proxy(live, proxy, ca=certificates["ca"])
    row = wait_state(live, "offline")
    assert "401" in row["error"], row["error"]

    via_proxy(live, proxy, ca=certificates["ca"], headers={"X-Proxy-Token": TOKEN})
    wait_state(live, "online")
    prompt_id = live.master.queue_prompt(image_workflow(seed=100, batch=1))
    entry = live.master.wait_prompt(prompt_id, 120)
    assert error_of(entry) == "" and blue_values(live.master.saved_images(entry, "5")) == [100, 101, 102]

    shown = live.master.get("/distributed/config").json()
    worker = next(w for w in shown["config"]["workers"] if w["id"] == "worker1")
    assert worker["headers"] == {"X-Proxy-Token": "(hidden)"}
    # the panel saves what it was shown: the hidden value stays what it is
    worker["name"] = "pod"
    assert live.master.post("/distributed/config", shown["config"]).status_code == 200
    on_disk = json.loads(live.config_path.read_text())
    assert next(w for w in on_disk["workers"] if w["id"] == "worker1")["headers"] == {"X-Proxy-Token": TOKEN}
    wait_state(live, "online")
    for text in (json.dumps(live.master.get("/distributed/config").json()),
                 json.dumps(live.master.get("/distributed/status").json()), live.master.log_tail(400)):
        assert TOKEN not in text


def test_a_proxy_that_does_not_pass_websockets_is_named_and_the_worker_left_out(live, proxy, certificates):
    """The master opens a websocket (the relay) to every prompt it sends: a proxy that forwards
    plain requests only is named by the doctor, and a job fails that worker's share over to the
    others with the reason."""
    proxy.pass_websockets = False
    via_proxy(live, proxy, ca=certificates["ca"])
    wait_state(live, "online")  # its plain HTTP API answers through the proxy
    found = {i["id"]: i for i in live.master.post("/distributed/check", {}).json()["instances"]}["worker1"]
    assert found["relay"] is False and "pass websockets" in found["message"], found
    prompt_id = live.master.queue_prompt(image_workflow(seed=100, batch=1))
    entry = live.master.wait_prompt(prompt_id, 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [100, 101, 102]
    log = live.master.log_tail(400)
    assert "worker1 failed" in log and "pass websockets" in log, log[-2000:]
