"""Reliability end to end: workers that die, freeze or come back, cancels from the master, and
ComfyUI's own API staying responsive, on a real master and two real workers on loopback.

The machine these run on is small and shared, so nothing here asserts on timing: a bound on a wait
only stops a test that hangs. Figures worth watching are printed (run with -s to see them).
"""
from __future__ import annotations

import json
import signal
import statistics
import threading
import time

import pytest
import requests

from harness import blue_values, error_of, log_since, log_size, image_workflow, wait_until

pytestmark = pytest.mark.timeout(600)


# --- helpers -------------------------------------------------------------------------------------



def queue_items(instance) -> list[tuple[str, str, dict]]:
    """(state, prompt id, prompt) of every prompt running or pending on an instance."""
    body = instance.get("/queue").json()
    return ([("running", str(item[1]), item[2]) for item in body["queue_running"]]
            + [("pending", str(item[1]), item[2]) for item in body["queue_pending"]])


def job_of(prompt: dict) -> str:
    """The distributed job a worker's prompt belongs to ('' for other prompts)."""
    for node in prompt.values():
        raw = (node.get("inputs") or {}).get("_distributed") if isinstance(node, dict) else None
        if isinstance(raw, str):
            try:
                job = json.loads(raw).get("job")
            except ValueError:
                continue
            if job:
                return job
    return ""


def running_on(instance) -> bool:
    return any(state == "running" for state, _pid, _p in queue_items(instance))


def jobs(live) -> list[dict]:
    return live.master.get("/distributed/status").json()["jobs"]


def clear_offline_memory(live) -> None:
    """GET /distributed/status until it sees every instance answer: a worker it sees online is no
    longer kept out of new plans (a failure keeps a worker out for 20 s otherwise)."""
    def all_answer():
        rows = live.master.get("/distributed/status", timeout=30).json()["instances"]
        return all(r["state"] in ("online", "busy") for r in rows)
    wait_until(all_answer, 60, interval=0.5, what="every instance to answer /distributed/status")


@pytest.fixture(autouse=True)
def answering(live):
    """Every test starts with every worker back in the master's plans, whatever the last test did,
    and leaves nothing running: a job that hung (a bug these tests exist to find) is cancelled so
    that it does not fail every test after it."""
    clear_offline_memory(live)
    yield
    for instance in live.instances:
        instance.signal(signal.SIGCONT)
    try:
        wait_until(lambda: all(i.idle() for i in live.instances), 30, interval=0.5, what="idle instances")
    except (TimeoutError, requests.RequestException):
        print("\n[reliability] something was still running after the test: interrupting everything")
        calls = [(live.master, "/distributed/interrupt", None)] + [
            (i, path, body) for i in live.instances for path, body in (("/queue", {"clear": True}), ("/interrupt", None))]
        for instance, path, body in calls:
            try:
                instance.post(path, body, timeout=10)
            except requests.RequestException:
                pass  # a dead instance: the next test's `live` restarts it


def kill(instance) -> None:
    instance.signal(signal.SIGKILL)
    instance.process.wait(30)


def ensure_running(instances) -> None:
    for instance in instances:
        instance.signal(signal.SIGCONT)
        if instance.process.poll() is not None:
            instance.start()
    for instance in instances:
        instance.wait_ready()


def run(live, prompt, timeout=180):
    prompt_id = live.master.queue_prompt(prompt)
    return prompt_id, live.master.wait_prompt(prompt_id, timeout)


def probe_ports(live, label: str) -> list[int]:
    return [p["port"] for p in live.probes() if p["label"] == label]


# --- workers that die --------------------------------------------------------------------------

def test_worker_killed_while_rendering_ten_times(live):
    """kill -9 a worker while its share renders, ten times, alternating the two workers: every job
    still ends with the whole batch in order, and each failure is reported in the master's log."""
    live.reset_config(live.default_config(job_timeout=8))
    start = log_size(live.master)
    killed = {w.name: 0 for w in live.workers}
    took = []
    try:
        for i in range(10):
            victim, other = live.workers[i % 2], live.workers[(i + 1) % 2]
            # the other worker was killed last round and restarted meanwhile: it must take the units now
            other.wait_ready()
            clear_offline_memory(live)
            seed = 100 + 10 * i  # blue is the seed's low byte: keep below 254
            began = time.monotonic()
            prompt_id = live.master.queue_prompt(image_workflow(seed=seed, batch=1, seconds_per_image=3.0,
                                                                label=f"death{i}"))
            wait_until(lambda: running_on(victim), 60, interval=0.1, what=f"{victim.name} to run its share")
            time.sleep(0.5)  # inside the probe's 3 s
            kill(victim)
            killed[victim.name] += 1
            victim.start()  # comes back in the background while the job recovers
            entry = live.master.wait_prompt(prompt_id, 180)
            took.append(time.monotonic() - began)
            assert error_of(entry) == "", f"round {i}: {error_of(entry)}"
            assert blue_values(live.master.saved_images(entry, "5")) == [seed, seed + 1, seed + 2], f"round {i}"
            assert victim.port not in probe_ports(live, f"death{i}"), "the killed worker cannot have rendered"
    finally:
        ensure_running(live.workers)
    print(f"\n[reliability] ten kills: per job {min(took):.1f}..{max(took):.1f} s, "
          f"median {statistics.median(took):.1f} s")
    log = log_since(live.master, start)
    for name, count in killed.items():
        assert log.count(f"[Distributed] {name} failed:") >= count, log[-4000:]
    assert log.count("completed after recovering") >= 10, log[-4000:]


def test_every_worker_dead_is_a_clear_error_without_a_hang(live):
    live.reset_config(live.default_config(job_timeout=5))
    prompt_id = live.master.queue_prompt(image_workflow(seed=60, batch=1, seconds_per_image=3.0))
    wait_until(lambda: all(running_on(w) for w in live.workers), 60, interval=0.1,
               what="both workers to run their shares")
    for worker in live.workers:
        kill(worker)
    began = time.monotonic()
    try:
        entry = live.master.wait_prompt(prompt_id, 120)  # a bound only: a hang fails here
        took = time.monotonic() - began
        message = error_of(entry)
        print(f"\n[reliability] every worker dead: the job ended {took:.1f} s after the kills "
              f"(job_timeout 5 s): {message}")
        assert message, "the job cannot succeed with every worker dead"
        for worker in live.workers:
            assert worker.name in message, f"the error does not name {worker.name}: {message}"
        wait_until(lambda: jobs(live) == [], 20, what="the master to let go of the job")
    finally:
        ensure_running(live.workers)
        clear_offline_memory(live)


# --- frozen workers ----------------------------------------------------------------------------

def test_worker_frozen_at_dispatch_is_worked_around(live):
    worker = live.workers[0]
    start = log_size(live.master)
    worker.signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        _pid, entry = run(live, image_workflow(seed=40, batch=1, seconds_per_image=0.5, label="frozen"))
        took = time.monotonic() - began
        assert error_of(entry) == ""
        assert blue_values(live.master.saved_images(entry, "5")) == [40, 41, 42]
        assert worker.port not in probe_ports(live, "frozen")
        assert probe_ports(live, "frozen").count(live.workers[1].port) == 2, live.probes()
        log = log_since(live.master, start)
        # noticed by the dispatch's own timeout, not by the (longer) job timeout
        assert f"{worker.name} failed:" in log and "did not answer in time" in log, log[-3000:]
        print(f"\n[reliability] worker frozen at dispatch: job done in {took:.1f} s")
    finally:
        worker.signal(signal.SIGCONT)
    clear_offline_memory(live)


def test_worker_frozen_mid_job_hands_its_units_on(live):
    live.reset_config(live.default_config(job_timeout=5))
    worker = live.workers[0]
    start = log_size(live.master)
    prompt_id = live.master.queue_prompt(image_workflow(seed=50, batch=1, seconds_per_image=3.0, label="midfreeze"))
    wait_until(lambda: running_on(worker), 60, interval=0.1, what=f"{worker.name} to run its share")
    time.sleep(0.5)
    worker.signal(signal.SIGSTOP)
    began = time.monotonic()
    try:
        entry = live.master.wait_prompt(prompt_id, 120)
        took = time.monotonic() - began
        assert error_of(entry) == ""
        assert blue_values(live.master.saved_images(entry, "5")) == [50, 51, 52]
        assert probe_ports(live, "midfreeze").count(live.workers[1].port) == 2, live.probes()
        log = log_since(live.master, start)
        assert f"{worker.name} failed: no sign of progress" in log, log[-3000:]
        print(f"\n[reliability] worker frozen mid-job: job done {took:.1f} s after the freeze (job_timeout 5 s)")
    finally:
        worker.signal(signal.SIGCONT)
    clear_offline_memory(live)


class _AnswersOnlyTheDispatch:
    """A stand-in worker that takes its prompt, then answers every later request with 500, as a
    ComfyUI does that crashes or wedges right after accepting a prompt. Before that it answers the
    node list (``object_info``, a real worker's) that the master reads before dispatch."""

    def __init__(self, object_info: dict):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/prompt":
                    self._answer(200, {"prompt_id": "taken-then-gone", "number": 1, "node_errors": {}})
                else:
                    self._answer(500, {"error": "wedged"})

            def do_GET(self):
                if self.path == "/object_info":
                    self._answer(200, object_info)
                else:
                    self._answer(500, {"error": "wedged"})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_worker_that_stops_answering_right_after_dispatch(live):
    """The first poll after the dispatch fails (the worker died or wedged at once): within
    job_timeout its units go to another worker and the job completes."""
    with _AnswersOnlyTheDispatch(live.workers[1].get("/object_info").json()) as fake:
        config = live.default_config(job_timeout=5)
        config["workers"][0] = {"id": "wedged", "name": "wedged", "port": fake.port, "enabled": True}
        live.reset_config(config)
        start = log_size(live.master)
        prompt_id = live.master.queue_prompt(image_workflow(seed=90, batch=1, label="wedged"))
        try:
            entry = live.master.wait_prompt(prompt_id, 90)
        except TimeoutError:
            live.master.post("/interrupt")  # the master's Collector would wait for ever
            live.master.wait_prompt(prompt_id, 60)
            log = log_since(live.master, start)
            pytest.fail("the job hung: the wedged worker's units were never handed on. Master log:\n"
                        + log[-3000:])
    assert error_of(entry) == ""
    # slot 1 is the wedged worker's: rendered by worker2 with slot 1's seed
    assert blue_values(live.master.saved_images(entry, "5")) == [90, 91, 92]
    assert "wedged failed: no sign of progress" in log_since(live.master, start)


# --- a worker that comes back --------------------------------------------------------------------

def test_worker_that_comes_back_is_used_again(live):
    worker = live.workers[0]
    kill(worker)
    try:
        _pid, entry = run(live, image_workflow(seed=70, batch=1, label="away"))
        assert error_of(entry) == ""
        assert blue_values(live.master.saved_images(entry, "5")) == [70, 71, 72]
        assert worker.port not in probe_ports(live, "away")
        worker.start().wait_ready()
        # the master's next check (every 2 s) finds it again
        wait_until(lambda: {r["id"]: r for r in live.master.get("/distributed/status").json()["instances"]}
                   [worker.name]["state"] == "online", 30, interval=0.3, what="the master to see the worker back")
        _pid, entry = run(live, image_workflow(seed=80, batch=1, label="back"))
        assert error_of(entry) == ""
        assert blue_values(live.master.saved_images(entry, "5")) == [80, 81, 82]
        assert worker.port in probe_ports(live, "back"), live.probes()
    finally:
        ensure_running([worker])


# --- cancels from the master -------------------------------------------------------------------

@pytest.mark.parametrize("master_renders", [True, False], ids=["master-renders", "master-only-gathers"])
def test_interrupt_on_the_master_withdraws_the_workers(live, master_renders):
    """ComfyUI's own cancel (POST /interrupt on the master) while the workers render a long share:
    the workers stop too (they would otherwise render for 40 s more) and the master holds no job."""
    config = live.default_config()
    config["master"]["enabled"] = master_renders
    live.reset_config(config)
    prompt_id = live.master.queue_prompt(image_workflow(seed=200, batch=2, seconds_per_image=20.0, label="cancel"))
    wait_until(lambda: all(running_on(w) for w in live.workers), 60, interval=0.1,
               what="both workers to run their shares")
    wait_until(lambda: jobs(live) and jobs(live)[0]["state"] == "running", 20, what="the job to run")
    time.sleep(1.0)  # the master is inside its probe, or (only gathering) inside the Collector's wait
    assert live.master.post("/interrupt").status_code == 200
    began = time.monotonic()
    entry = live.master.wait_prompt(prompt_id, 60)
    assert entry["status"]["status_str"] == "error"
    try:
        wait_until(lambda: all(w.idle() for w in live.workers), 25, what="every worker to be idle")
    except TimeoutError:
        busy = {w.name: queue_items(w) for w in live.workers}
        pytest.fail(f"the workers still run their shares {time.monotonic() - began:.0f} s after the "
                    f"master's prompt was interrupted: {[(n, [s for s, _i, _p in q]) for n, q in busy.items()]}")
    print(f"\n[reliability] interrupt ({'master renders' if master_renders else 'master gathers'}): "
          f"workers idle {time.monotonic() - began:.1f} s after it")
    wait_until(lambda: jobs(live) == [], 20, what="the master to let go of the job")
    assert not [p for p in live.probes() if p["label"] == "cancel" and p["port"] != live.master.port], \
        "a worker rendered its whole share although the job was interrupted"


def test_deleting_a_queued_prompt_withdraws_its_worker_prompts(live):
    first = live.master.queue_prompt(image_workflow(seed=210, batch=1, seconds_per_image=4.0, label="A"))
    second = live.master.queue_prompt(image_workflow(seed=220, batch=1, seconds_per_image=4.0, label="B"))

    def job_b_dispatched():
        job = next((j for j in jobs(live) if j["prompt_id"] == second), None)
        workers = [s for s in (job or {}).get("shares", []) if s["participant"] != "master"]
        return job if workers and all(s["state"] in ("queued", "running") for s in workers) else None
    job = wait_until(job_b_dispatched, 30, what="job B's worker prompts to be queued")
    on_workers = {w.name: [pid for _s, pid, p in queue_items(w) if job_of(p) == job["job_id"]] for w in live.workers}
    assert all(on_workers.values()), f"B's prompts are not on every worker: {on_workers}"
    resp = live.master.post("/queue", {"delete": [second]})
    assert resp.status_code == 200
    wait_until(lambda: not any(job_of(p) == job["job_id"] for w in live.workers for _s, _i, p in queue_items(w)),
               20, what="B's worker prompts to be withdrawn")
    entry = live.master.wait_prompt(first, 120)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [210, 211, 212]
    wait_until(lambda: all(w.idle() for w in live.instances), 30, what="every instance to be idle")
    assert probe_ports(live, "B") == [], "job B ran although it was deleted from the master's queue"
    for worker in live.workers:  # withdrawn: never finished successfully on a worker
        for pid in on_workers[worker.name]:
            item = worker.get(f"/history/{pid}").json().get(pid)
            assert item is None or item["status"]["status_str"] == "error", item
    assert jobs(live) == []


# --- ComfyUI's own API stays responsive ------------------------------------------------------------

class LatencySampler:
    """GET /prompt on an instance over and over from a thread; records every answer's latency."""

    def __init__(self, url: str):
        self.url = url
        self.samples: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                resp = session.get(self.url + "/prompt", timeout=30)
                if resp.status_code != 200 or "exec_info" not in resp.json():
                    self.failures.append(f"{resp.status_code}: {resp.text[:200]}")
            except (requests.RequestException, ValueError) as exc:
                self.failures.append(repr(exc))
            self.samples.append(time.perf_counter() - began)
            self._stop.wait(0.02)

    def __enter__(self) -> "LatencySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def figures(self) -> str:
        ms = sorted(s * 1000 for s in self.samples)
        if not ms:
            return "no samples"
        over = sum(1 for s in ms if s > 100)
        return (f"{len(ms)} requests, p50 {statistics.median(ms):.1f} ms, "
                f"p95 {ms[int(len(ms) * 0.95) - 1]:.1f} ms, max {ms[-1]:.1f} ms, over 100 ms: {over}")


def test_comfyui_api_answers_while_results_stream_and_a_worker_is_frozen(live):
    with LatencySampler(live.master.url) as streaming:
        _pid, entry = run(live, image_workflow(seed=20, batch=4, size=1024))
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [20] * 4 + [21] * 4 + [22] * 4

    live.reset_config(live.default_config(job_timeout=5))
    worker = live.workers[0]
    with LatencySampler(live.master.url) as frozen:
        prompt_id = live.master.queue_prompt(image_workflow(seed=230, batch=1, seconds_per_image=3.0))
        wait_until(lambda: running_on(worker), 60, interval=0.1, what=f"{worker.name} to run its share")
        worker.signal(signal.SIGSTOP)
        try:
            entry = live.master.wait_prompt(prompt_id, 120)
        finally:
            worker.signal(signal.SIGCONT)
    assert error_of(entry) == ""
    assert blue_values(live.master.saved_images(entry, "5")) == [230, 231, 232]
    clear_offline_memory(live)
    print(f"\n[reliability] GET /prompt while 3 x 4 images of 1024x1024 stream in: {streaming.figures()}"
          f"\n[reliability] GET /prompt while a worker is frozen: {frozen.figures()}")
    assert streaming.samples and frozen.samples
    assert streaming.failures == [] and frozen.failures == []
