"""A real remote worker: a ComfyUI on another address, inside a network namespace that the test
makes (a veth pair, a /30 of its own), so master and worker talk across a real interface.

A firewall rule in that namespace (nftables) can drop every connection the worker opens to the
master: it still takes part in every kind of job, since the master opens every connection (the
relays of distributed_core/relay.py). Skipped only where the kernel refuses to create network
namespaces; the reason is printed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import Instance, blue_values, error_of, free_port, image_workflow, wait_until, write_config

pytestmark = pytest.mark.timeout(600)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def test_host():
    """(namespace, the master's address on the link, the remote worker's address)."""
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' program (iproute2) is missing, so no test host can be made")
    name, link = f"cdist{os.getpid()}", f"cdv{os.getpid()}"
    subnet = 10 + os.getpid() % 240
    here, there = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        print(f"\nSKIPPED: the kernel refuses network namespaces here: {made.stderr.strip()}")
        pytest.skip(f"the kernel refuses network namespaces here: {made.stderr.strip()}")
    try:
        _ip("link", "add", link, "type", "veth", "peer", "name", link + "p")
        _ip("link", "set", link + "p", "netns", name)
        _ip("addr", "add", f"{here}/30", "dev", link)
        _ip("link", "set", link, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{there}/30", "dev", link + "p")
        _ip("netns", "exec", name, "ip", "link", "set", link + "p", "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, here, there
    finally:
        _ip("netns", "del", name, check=False)  # takes the veth pair with it
        _ip("link", "del", link, check=False)


@pytest.fixture(scope="module")
def remote(cluster, test_host, tmp_path_factory):
    """A master listening on the link, and a worker on the test host; both from the session's tree."""
    name, here, there = test_host
    workdir = tmp_path_factory.mktemp("remote")
    env = {**cluster.env, "COMFYUI_DISTRIBUTED_CONFIG": str(workdir / "gpu_config.json"),
           "COMFYUI_DISTRIBUTED_SECRET_FILE": str(workdir / "secret.key"),
           "DISTRIBUTED_TEST_PROBE_LOG": str(workdir / "probe.jsonl")}
    master = Instance(cluster.tree, "master", free_port(), workdir, env, host=here)
    worker = Instance(cluster.tree, "remote", free_port(), workdir, env, host=there,
                      prefix=["ip", "netns", "exec", name])
    config = {"master": {"port": master.port, "enabled": True},
              "workers": [{"id": "remote", "name": "remote box", "host": there, "port": worker.port}],
              "settings": {"job_timeout": 8}}
    write_config(workdir / "gpu_config.json", config)
    try:
        for instance in (master, worker):
            instance.start()
        for instance in (master, worker):
            instance.wait_ready()
        # jobs plan with what the master's background checks last saw: let them see the worker up
        wait_until(lambda: all(r["state"] in ("online", "busy") for r in
                               master.get("/distributed/status").json()["instances"] if r["enabled"]),
                   60, interval=0.3, what="the master to see the remote worker online")
        yield master, worker, workdir, config
    finally:
        for instance in (master, worker):
            instance.stop()


def test_a_job_comes_back_from_a_remote_worker(remote):
    master, worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", config)
    entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=40, batch=2)), 120)
    assert error_of(entry) == ""
    assert blue_values(master.saved_images(entry, "5")) == [40, 40, 41, 41]
    assert worker.get("/history").json(), "the remote worker ran nothing"


def test_loaded_input_images_are_uploaded_to_a_remote_worker(remote):
    master, worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", config)
    Image.fromarray(np.full((16, 16, 3), (10, 200, 30), np.uint8)).save(master.dirs["input"] / "photo.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "MultiGPUCollector", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded"}},
    }
    assert not (worker.dirs["input"] / "photo.png").exists()
    entry = master.wait_prompt(master.queue_prompt(prompt), 120)
    assert error_of(entry) == ""
    assert (worker.dirs["input"] / "photo.png").read_bytes() == (master.dirs["input"] / "photo.png").read_bytes()
    images = master.saved_images(entry, "3")
    assert len(images) == 2 and all(tuple(img[0, 0]) == (10, 200, 30) for img in images)


CAN_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def connects_from_test_host(test_host, host: str, port: int) -> bool:
    import sys
    name, _here, _there = test_host
    run = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", CAN_CONNECT, host, str(port)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip() == "connected"


@pytest.fixture
def firewalled(remote, test_host):
    """A firewall rule on the test host drops every connection it opens to the master's address;
    the master's own connections to the worker (and their answers) still pass."""
    if shutil.which("nft") is None:
        pytest.fail("the 'nft' program (Debian's nftables) is missing; tests/run.py installs it")
    master, _worker, _workdir, _config = remote
    name, here, _there = test_host
    assert connects_from_test_host(test_host, here, master.port), "the worker could not reach the master before"
    table = ["ip", "netns", "exec", name, "nft"]
    subprocess.run([*table, "add", "table", "inet", "cdist"], check=True)
    subprocess.run([*table, "add", "chain", "inet", "cdist", "out",
                    "{ type filter hook output priority 0; policy accept; }"], check=True)
    subprocess.run([*table, "add", "rule", "inet", "cdist", "out", "ip", "daddr", here, "ct", "state", "new", "drop"],
                   check=True)
    try:
        assert not connects_from_test_host(test_host, here, master.port), "the firewall rule lets the worker through"
        yield
    finally:
        subprocess.run([*table, "delete", "table", "inet", "cdist"], check=False)


def settled_history(worker) -> set[str]:
    """The ids in the worker's history once its queue is empty: a test before may leave the worker
    finishing a prompt that the master no longer waits for (a tile worker asking for one more lease)."""
    wait_until(worker.idle, 60, interval=0.3, what="the worker's queue to empty")
    return set(worker.get("/history").json())


def test_a_worker_that_cannot_reach_the_master_takes_part_in_a_collector_job(remote, firewalled):
    master, worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", config)
    before = settled_history(worker)
    entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=41, batch=1)), 120)
    assert error_of(entry) == ""
    assert blue_values(master.saved_images(entry, "5")) == [41, 42]  # the worker's image is the second
    assert len(settled_history(worker) - before) == 1


def test_a_worker_that_cannot_reach_the_master_takes_spread_prompts(remote, firewalled):
    from test_e2e_spread import plain_workflow
    master, worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", {**config, "settings": {**config["settings"], "spread_queue": True}})
    before = settled_history(worker)
    try:
        ids = [master.queue_prompt(plain_workflow(k, seconds=1.0)) for k in range(4)]
        entries = [master.wait_prompt(pid, 120) for pid in ids]
    finally:
        write_config(workdir / "gpu_config.json", config)
    for k, entry in enumerate(entries):
        assert error_of(entry) == ""
        [item] = entry["outputs"]["3"]["images"]
        pixel = np.asarray(Image.open(master.dirs["output"] / item.get("subfolder", "") / item["filename"]))[0, 0]
        assert pixel.tolist()[:3] == [0, (1000 + k) >> 8 & 0xFF, (1000 + k) & 0xFF]
    assert settled_history(worker) - before, "the worker rendered none of the spread prompts"


def test_a_worker_that_cannot_reach_the_master_takes_tiles_of_an_upscale(remote, firewalled, cluster):
    from harness import CHECKPOINT, build_checkpoint, link_checkpoint
    from distributed_core import sandbox
    from test_e2e_upscale import log_since, log_size, tallies, upscale_workflow
    master, _worker, workdir, config = remote
    link_checkpoint(cluster.tree, build_checkpoint(cluster.tree, sandbox.CACHE / CHECKPOINT))
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (17, 17, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((64, 64), Image.BILINEAR).save(master.dirs["input"] / "remote-source.png")
    write_config(workdir / "gpu_config.json", {**config, "settings": {**config["settings"], "job_timeout": 60}})
    start = log_size(master)
    try:
        entry = master.wait_prompt(master.queue_prompt(upscale_workflow(["remote-source.png"], tile=32)), 300)
    finally:
        write_config(workdir / "gpu_config.json", config)
    assert error_of(entry) == ""
    tally = tallies(log_since(master, start))
    assert len(tally) == 1 and sum(tally[0].values()) == 16, tally
    assert tally[0].get("remote box", 0) >= 1, f"the worker rendered no tile: {tally}"


@pytest.fixture
def ssh_tunnel(remote, test_host, tmp_path):
    """The README's one-way tunnel: an sshd on the test host, and `ssh -N -L 127.0.0.2:<port>:...`
    from the master's machine to the worker's ComfyUI. Yields the tunnel's local port."""
    for program in ("ssh", "ssh-keygen", "/usr/sbin/sshd"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is missing (Debian's openssh-client and openssh-server); tests/run.py installs them")
    _master, worker, _workdir, _config = remote
    name, _here, there = test_host
    key, host_key = tmp_path / "id", tmp_path / "host_key"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    ssh_port, local_port = free_port(), free_port()
    sshd = subprocess.Popen(["ip", "netns", "exec", name, "/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null",
                             "-p", str(ssh_port), "-o", f"ListenAddress={there}", "-o", f"HostKey={host_key}",
                             "-o", f"AuthorizedKeysFile={tmp_path / 'authorized_keys'}", "-o", "StrictModes=no",
                             "-o", "PermitRootLogin=yes", "-o", "PasswordAuthentication=no",
                             "-o", f"PidFile={tmp_path / 'sshd.pid'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tunnel = None
    try:
        wait_until(lambda: connects_from_test_host(test_host, there, ssh_port), 20, interval=0.3, what="sshd")
        tunnel = subprocess.Popen(["ssh", "-N", "-i", str(key), "-p", str(ssh_port), "-o", "StrictHostKeyChecking=no",
                                   "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
                                   "-o", "BatchMode=yes", "-L", f"127.0.0.2:{local_port}:{there}:{worker.port}",
                                   f"root@{there}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import requests
        wait_until(lambda: tunnel.poll() is None and _answers(f"http://127.0.0.2:{local_port}/system_stats", requests),
                   30, interval=0.3, what="the tunnel to the worker")
        yield local_port
    finally:
        for process in (tunnel, sshd):
            if process is not None:
                process.terminate()
                process.wait(10)


def _answers(url: str, requests) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_worker_through_a_one_way_ssh_tunnel_takes_part(remote, firewalled, ssh_tunnel):
    """As the README's Setups say: `ssh -L` only, no `-R`, and the worker cannot reach the master."""
    master, worker, workdir, config = remote
    tunnelled = {**config, "workers": [{"id": "remote", "name": "remote box", "host": "127.0.0.2",
                                        "port": ssh_tunnel}]}
    write_config(workdir / "gpu_config.json", tunnelled)
    before = settled_history(worker)
    try:
        wait_until(lambda: all(r["state"] in ("online", "busy") for r in
                               master.get("/distributed/status").json()["instances"] if r["enabled"]),
                   60, interval=0.3, what="the master to see the tunnelled worker online")
        entry = master.wait_prompt(master.queue_prompt(image_workflow(seed=43, batch=1)), 120)
    finally:
        write_config(workdir / "gpu_config.json", config)
    assert error_of(entry) == ""
    assert blue_values(master.saved_images(entry, "5")) == [43, 44]
    assert len(settled_history(worker) - before) == 1


def test_the_check_says_a_worker_that_cannot_reach_the_master_is_ready(remote, firewalled):
    """POST /distributed/check, before any job: the master opens a relay probe to the worker; the
    worker is never asked to reach the master."""
    master, worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", config)
    before = settled_history(worker)
    found = {i["id"]: i for i in master.post("/distributed/check", {}).json()["instances"]}["remote"]
    assert found["reachable"] is True and found["relay"] is True, found
    assert found["message"] == "Ready."
    assert settled_history(worker) == before  # a check runs no prompt


def test_a_master_that_listens_on_loopback_only_takes_a_remote_worker(cluster, remote):
    """Nothing reaches the master back, so it need not listen on the network at all."""
    _master, worker, _workdir, _config = remote
    config = cluster.default_config()
    config["workers"] = [{"id": "remote", "name": "remote box", "host": worker.host, "port": worker.port}]
    cluster.reset_config(config)
    before = settled_history(worker)
    try:
        wait_until(lambda: all(r["state"] in ("online", "busy") for r in
                               cluster.master.get("/distributed/status").json()["instances"] if r["enabled"]),
                   60, interval=0.3, what="the master to see the remote worker online")
        entry = cluster.master.wait_prompt(cluster.master.queue_prompt(image_workflow(seed=42, batch=1)), 120)
    finally:
        cluster.reset_config()
    assert error_of(entry) == ""
    assert blue_values(cluster.master.saved_images(entry, "5")) == [42, 43]
    assert len(settled_history(worker) - before) == 1


# --- access from another machine -------------------------------------------------------------------

FROM_THERE = """
import json, sys, urllib.request, urllib.error
url, requests_ = sys.argv[1], json.loads(sys.argv[2])
answers = []
for method, path, headers, body in requests_:
    req = urllib.request.Request(url + path, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            answers.append([resp.status, json.loads(resp.read())])
    except urllib.error.HTTPError as exc:
        answers.append([exc.code, json.loads(exc.read() or b"{}")])
print(json.dumps(answers))
"""


def from_test_host(test_host, url: str, calls: list) -> list:
    """Send requests from the test host (another machine, as far as the master can tell)."""
    import json
    import sys
    name, _here, _there = test_host
    run = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", FROM_THERE, url, json.dumps(calls)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_forged_browser_headers_from_another_machine_get_nothing(remote, test_host):
    master, _worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", config)
    before = (workdir / "gpu_config.json").read_text()
    netloc = master.url.split("//", 1)[1]
    browser = {"Host": netloc, "Sec-Fetch-Site": "same-origin", "Origin": master.url}
    loopback = {"Host": f"127.0.0.1:{master.port}", "Sec-Fetch-Site": "same-origin",
                "Origin": f"http://127.0.0.1:{master.port}"}
    calls = [[method, path, headers, body] for headers in (browser, loopback, {"Origin": master.url}, {})
             for method, path, body in [("POST", "/distributed/config", config), ("GET", "/distributed/secret", None),
                                        ("GET", "/distributed/config", None), ("POST", "/distributed/workers",
                                                                              {"port": 9000}),
                                        ("GET", "/distributed/workers/remote/log", None)]]
    answers = from_test_host(test_host, master.url, calls)
    assert [status for status, _ in answers] == [403] * len(calls), answers
    assert all("secret" in answer["error"] for _, answer in answers)
    assert (workdir / "gpu_config.json").read_text() == before


def test_another_machine_with_the_secret_may_change_but_not_read_the_secret(remote, test_host):
    master, _worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", config)
    secret = master.auth()
    assert secret
    answers = from_test_host(test_host, master.url, [
        ["POST", "/distributed/config", secret, {**config, "settings": {"job_timeout": 9}}],
        ["GET", "/distributed/status", secret, None],
        ["GET", "/distributed/secret", {**secret, "Sec-Fetch-Site": "same-origin", "Origin": master.url}, None],
    ])
    assert [status for status, _ in answers] == [200, 200, 403], answers
    import json
    assert json.loads((workdir / "gpu_config.json").read_text())["settings"]["job_timeout"] == 9


def test_a_browser_on_the_masters_machine_may_use_its_network_address(remote):
    """The peer is this machine's own address, not loopback: still the master's own machine."""
    import requests
    master, _worker, _workdir, _config = remote
    page = {"Sec-Fetch-Site": "same-origin"}
    shown = requests.get(master.url + "/distributed/secret", headers=page, timeout=10)
    assert shown.status_code == 200 and {"X-Distributed-Secret": shown.json()["secret"]} == master.auth()


@pytest.mark.browser
def test_the_panel_in_a_browser_on_another_machine_asks_for_the_secret_once(remote, test_host, tmp_path):
    """Chromium runs on the test host: the panel is refused until the user enters the secret, asks
    again after a wrong one, then keeps it (a reload does not ask again)."""
    from playwright import sync_api
    from ui_support import ComfyPage, chromium_path
    master, _worker, workdir, config = remote
    write_config(workdir / "gpu_config.json", config)
    name, _here, _there = test_host
    wrapper = tmp_path / "chromium-there"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {name} {chromium_path()} "$@"\n')
    wrapper.chmod(0o755)
    secret = master.auth()["X-Distributed-Secret"]
    answers = ["wrong-" + secret, secret]
    asked = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept(answers.pop(0) if answers else "")

    with sync_api.sync_playwright() as playwright:
        from ui_support import CHROMIUM_ARGS
        browser = playwright.chromium.launch(executable_path=str(wrapper), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("dialog", answer)
            comfy = ComfyPage(page, master.url)
            comfy.expected_statuses = {403}  # the refusals before the secret is entered
            panel = comfy.open_panel()
            sync_api.expect(panel.locator('.cdist-instance[data-state="online"]')).to_have_count(2, timeout=60_000)
            assert len(asked) == 2 and "refused" in asked[1], asked
            assert page.evaluate("localStorage.getItem('comfyui-distributed.secret')") == secret
            page.reload()
            comfy.open_panel()
            sync_api.expect(comfy.panel().locator('.cdist-instance[data-state="online"]')).to_have_count(2,
                                                                                                      timeout=60_000)
            assert len(asked) == 2
            assert not comfy.own_errors(), comfy.own_errors()
        finally:
            browser.close()
