"""The coordinator's decisions, with a fake ComfyUI behind a real InstanceClient (its HTTP calls
answered in process) and a fake clock: who is planned in, where a failed share goes, what ending a
job withdraws. The same behaviours run against real servers in the end-to-end tests."""
from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from distributed_core import config as config_file
from distributed_core import coordinator as coordinator_module
from distributed_core import plan
from distributed_core.client import InstanceClient, InstanceError
from distributed_core.coordinator import Coordinator
from distributed_core.jobs import JobState, JobStore
from distributed_core.reach import Clock
from harness import image_workflow, split_workflow

MASTER = "http://127.0.0.1:18188"
W1, W2, W3 = "http://127.0.0.1:18189", "http://127.0.0.1:18190", "http://127.0.0.1:18191"


class FakeClock(Clock):
    """Time moves only when a test advances it; sleepers wake once it passes their deadline."""

    def __init__(self):
        self.t = 1000.0
        self.sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        due = [(d, f) for d, f in self.sleepers if d <= self.t]
        self.sleepers = [(d, f) for d, f in self.sleepers if d > self.t]
        for _d, future in due:
            if not future.done():
                future.set_result(None)

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.t + max(0.0, seconds), future))
        await future

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        await asyncio.wait([waiter, sleeper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        sleeper.cancel()


class Instance:
    """One fake ComfyUI: its queue, its history, and everything asked of it."""

    ids = itertools.count(1)

    def __init__(self, url: str):
        self.url = url
        self.up = True
        self.refuses = True  # when down: the connection is refused (else it times out)
        self.running: list[str] = []
        self.pending: list[str] = []
        self.history: dict[str, dict] = {}
        self.prompts: dict[str, dict] = {}
        self.calls: list[tuple[str, str, object]] = []
        self.hold_posts: asyncio.Event | None = None  # set: POST /prompt waits for it
        self.jobs_api = False  # ComfyUI 0.38's GET /api/jobs/{id} and POST /api/jobs/{id}/cancel

    def finish(self, prompt_id: str, status: str = "success") -> None:
        for queue in (self.running, self.pending):
            if prompt_id in queue:
                queue.remove(prompt_id)
        self.history[prompt_id] = {"status": {"status_str": status, "messages": []}, "outputs": {}}


class EveryNode(dict):
    """An /object_info answer that has every node class, each with no inputs to check."""

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        return {"input": {}}


class FakeClient(InstanceClient):
    def __init__(self, world: dict[str, Instance], url: str, features: dict | None = None):
        super().__init__(None, url, features)
        self.world = world

    @staticmethod
    def _job(inst: Instance, path: str, method: str):
        """ComfyUI 0.38's jobs API, as read from its server (comfy_execution/jobs.py)."""
        if not inst.jobs_api:
            raise InstanceError(f"{inst.url}{path} answered 404: Not Found", status=404)
        if path.startswith("/api/jobs?"):
            return {"jobs": [], "pagination": {}}
        prompt_id = path.split("/")[3]
        if method == "POST":  # cancel: dequeued if pending, interrupted if running, else nothing
            if prompt_id in inst.pending:
                inst.pending.remove(prompt_id)
            return {"cancelled": prompt_id in inst.running}
        if prompt_id in inst.running or prompt_id in inst.pending:
            return {"id": prompt_id, "status": "in_progress" if prompt_id in inst.running else "pending"}
        if prompt_id not in inst.history:
            raise InstanceError(f"{inst.url}{path} answered 404: job not found", status=404)
        status = inst.history[prompt_id]["status"]
        if status["status_str"] == "success":
            return {"id": prompt_id, "status": "completed", "execution_status": status}
        return {"id": prompt_id, "status": "failed", "execution_error": {
            "node_id": "3", "node_type": "DistributedTestProbe", "exception_message": "out of ink"}}

    async def _request(self, method, path, timeout, body=None):
        inst = self.world.get(self.url)
        if inst is None or not inst.up:
            if inst is not None and not inst.refuses:
                raise InstanceError(f"{self.url} did not answer in time")
            raise InstanceError(f"cannot connect to {self.url}; is that ComfyUI instance running?", refused=True)
        inst.calls.append((method, path, body))
        if path.startswith("/api/jobs"):
            return self._job(inst, path, method)
        if (method, path) == ("POST", "/prompt"):
            if inst.hold_posts is not None:
                await inst.hold_posts.wait()
            prompt_id = f"p{next(Instance.ids)}"
            inst.prompts[prompt_id] = body["prompt"]
            inst.pending.append(prompt_id)
            return {"prompt_id": prompt_id}
        if method == "GET" and path.startswith("/history/"):
            prompt_id = path.rsplit("/", 1)[1]
            return {prompt_id: inst.history[prompt_id]} if prompt_id in inst.history else {}
        if (method, path) == ("GET", "/queue"):
            return {"queue_running": [[0, p, {}] for p in inst.running],
                    "queue_pending": [[1, p, {}] for p in inst.pending]}
        if (method, path) == ("POST", "/queue"):
            for prompt_id in body.get("delete", []):
                if prompt_id in inst.pending:
                    inst.pending.remove(prompt_id)
            return None
        if (method, path) == ("POST", "/interrupt"):
            return None
        if (method, path) == ("GET", "/system_stats"):
            return {"devices": [{"name": "fake"}]}
        if (method, path) == ("GET", "/prompt"):
            return {"exec_info": {"queue_remaining": len(inst.running) + len(inst.pending)}}
        if (method, path) == ("GET", "/object_info"):
            return EveryNode()
        raise AssertionError(f"unexpected {method} {path}")


def config_with(*workers: tuple[str, int, bool], master_enabled: bool = True) -> config_file.Config:
    return config_file.parse({"master": {"port": 18188, "enabled": master_enabled},
                              "settings": {"job_timeout": 30, "mode": "parallel"},
                              "workers": [{"id": wid, "port": port, "enabled": enabled}
                                          for wid, port, enabled in workers]})


class Harness:
    def __init__(self, tmp_path: Path, config: config_file.Config):
        self.config = config
        self.world = {url: Instance(url) for url in (MASTER, W1, W2, W3)}
        self.features: dict = {}  # what the clients learned of each fake's API
        global CLOCK
        self.clock = CLOCK = FakeClock()
        self.coord = Coordinator(JobStore(), lambda: config_file.Loaded(self.config, tmp_path / "c.json"),
                                 lambda: ("127.0.0.1", 18188),
                                 client_factory=lambda url: FakeClient(self.world, url, self.features),
                                 clock=self.clock)
        self.coord._throughput = plan.Throughput(tmp_path / "throughput.json")
        self.coord.reach.start = lambda: None  # the tests run the checks themselves (checked())

    def submit(self, prompt: dict) -> tuple[dict, list[str], list[str]]:
        """POST /prompt as the middleware sees it: (the request after the hook, jobs planned, refusals)."""
        pending, refusals = [], []
        tokens = coordinator_module.submitted.set(pending), coordinator_module.refused.set(refusals)
        try:
            data = self.coord.rewrite({"prompt": prompt, "client_id": "t"})
        finally:
            coordinator_module.submitted.reset(tokens[0])
            coordinator_module.refused.reset(tokens[1])
        return data, pending, refusals

    async def started(self, seed: int = 10) -> str:
        """A one-image multiply job submitted and started; its id."""
        _data, (job_id,), _refusals = self.submit(image_workflow(seed=seed, batch=1))
        await self.coord.start(job_id, "")
        return job_id

    async def checked(self) -> None:
        """One round of reachability checks, answered."""
        await asyncio.gather(*self.coord.reach.tick())

    def worker_prompts(self, url: str) -> list[dict]:
        return list(self.world[url].prompts.values())


CLOCK: FakeClock | None = None  # the running test's, advanced while waiting for a condition


async def until(predicate, steps: int = 20000) -> None:
    for step in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
        if CLOCK is not None and step % 20 == 19:
            CLOCK.advance(0.1)
    raise AssertionError("the condition never held")


def units_of(prompt: dict) -> list[int]:
    """The seed units a worker-role prompt renders (its Distributed Seed's field)."""
    import json
    field = json.loads(prompt["1"]["inputs"]["_distributed"])
    return field["units"]


def run(coro):
    return asyncio.run(coro)


# --- planning ------------------------------------------------------------------------------------

def test_a_worker_known_to_be_down_is_planned_out_and_its_slot_kept(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        h.world[W2].up = False
        await h.checked()
        _data, (job_id,), refusals = h.submit(image_workflow(seed=10, batch=1))
        job = h.coord.store.get(job_id)
        assert not refusals
        assert job.units == [0, 1, 2]  # the seed slots stay: w1 keeps offset 1
        assert {p: s.units for p, s in job.shares.items()} == {"master": [0, 2], "w1": [1]}
        assert any("w2" in n and W2 in n and "unreachable" in n for n in job.notices), job.notices
        h.coord.end(job_id, JobState.CANCELLED, "test")
    run(main())


def test_a_worker_with_no_answer_yet_is_tried(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        h.world[W2].up = False  # but no check has run yet
        _data, (job_id,), _r = h.submit(image_workflow(seed=10, batch=1))
        job = h.coord.store.get(job_id)
        assert set(job.shares) == {"master", "w1", "w2"} and not job.notices
        await h.coord.start(job_id, "")
        # its dispatch is refused: it is known down at once and its unit goes to w1
        await until(lambda: len(h.world[W1].prompts) == 2)
        assert sorted(units_of(p) for p in h.worker_prompts(W1)) == [[1], [2]]
        assert h.coord.reach.is_down(W2)
        assert any("w2 failed" in n for n in job.notices)
        h.coord.end(job_id, JobState.CANCELLED, "test")
    run(main())


def test_a_prompt_that_cannot_be_planned_is_refused_with_the_reason(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, False), master_enabled=False))
        data, planned, refusals = h.submit(image_workflow())
        assert "prompt" not in data and not planned
        assert "Nothing to render on" in refusals[0]
        h.config = config_with(("w1", 18189, True))
        linked = split_workflow(batch=4)
        linked["6"] = {"class_type": "DistributedSeed", "inputs": {"seed": 4}}
        linked["1"]["inputs"]["batch_size"] = ["6", 0]
        data, planned, refusals = h.submit(linked)
        assert "prompt" not in data and not planned and "must be a number in the node" in refusals[0]
        h.world[W1].up = False  # the master disabled and every worker down
        h.config = config_with(("w1", 18189, True), master_enabled=False)
        await h.checked()
        data, planned, refusals = h.submit(image_workflow())
        assert "prompt" not in data and "no enabled worker can be reached" in refusals[0] and "w1" in refusals[0]
        assert not h.coord.store.active()
    run(main())


def test_malformed_prompts_and_prompts_without_a_collector_are_left_alone(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        broken = image_workflow()
        broken["9"] = 5  # not a node: ComfyUI's validation names it
        data, planned, refusals = h.submit(broken)
        assert data["prompt"] is broken and not planned and not refusals
        plain = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
        data, planned, refusals = h.submit(plain)
        assert data["prompt"] is plain and not planned and not refusals
    run(main())


# --- failover --------------------------------------------------------------------------------------

def test_a_failed_share_goes_to_a_worker_that_is_left(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W2].prompts and h.world[W1].prompts)
        (failing,) = h.world[W2].prompts
        h.world[W2].finish(failing, status="error")
        await until(lambda: len(h.world[W1].prompts) == 2)
        assert sorted(units_of(p) for p in h.worker_prompts(W1)) == [[1], [2]]
        job = h.coord.store.get(job_id)
        assert job.shares["w2"].state == "failed"
        h.coord.end(job_id, JobState.CANCELLED, "test")
    run(main())


def test_failover_uses_the_current_config(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W2].prompts and h.world[W1].prompts)
        # mid-job, w1 is removed and w3 added
        h.config = config_with(("w2", 18190, True), ("w3", 18191, True))
        (failing,) = h.world[W2].prompts
        h.world[W2].finish(failing, status="error")
        await until(lambda: h.world[W3].prompts)
        assert [units_of(p) for p in h.worker_prompts(W3)] == [[2]]
        assert len(h.world[W1].prompts) == 1, "a worker removed from the config got failover work"
        h.coord.end(job_id, JobState.CANCELLED, "test")
        # disabled counts as removed: nobody is left, so the job fails and says why
        h.config = config_with(("w1", 18189, False), ("w2", 18190, True))
        _data, (job_id,), _r = h.submit(image_workflow(seed=10, batch=1))
        h.config = config_with(("w1", 18189, False), ("w2", 18190, True))
        await h.coord.start(job_id, "")
        await until(lambda: any(job_id in str(p) for p in h.worker_prompts(W2)))
        failing = next(pid for pid, p in h.world[W2].prompts.items() if job_id in str(p))
        h.world[W2].finish(failing, status="error")
        await until(lambda: h.coord.store.get(job_id).state is JobState.FAILED)
        assert "No other worker is left" in h.coord.store.get(job_id).error
        h.coord.end(job_id, JobState.FAILED)
    run(main())


def test_a_worker_whose_checks_are_refused_is_failed_over(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W2].prompts and h.world[W1].prompts)
        h.world[W2].up = False  # its process died: checks are refused
        for _ in range(coordinator_module.REFUSALS_MEAN_GONE):
            h.clock.advance(10)
            await h.checked()
        await until(lambda: len(h.world[W1].prompts) == 2)
        assert "gone" in h.coord.store.get(job_id).shares["w2"].error
        h.coord.end(job_id, JobState.CANCELLED, "test")
    run(main())


def test_no_false_failover_while_many_jobs_wait_in_a_queue(tmp_path):
    """Forty jobs queued on both workers for a long time: their prompts are there and answer,
    so nothing fails over, and each worker's whole queue is read rarely."""
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        await h.checked()
        jobs = []
        for k in range(40):
            job_id = await h.started(seed=k)
            jobs.append(job_id)
        await until(lambda: len(h.world[W1].prompts) == 40 and len(h.world[W2].prompts) == 40)
        began = h.clock.now()
        while h.clock.now() - began < 300:  # five minutes of queueing
            await h.checked()
            for _ in range(5):
                await asyncio.sleep(0)
            h.clock.advance(0.5)
        assert not any(n for j in jobs for n in h.coord.store.get(j).notices)
        queue_reads = sum(1 for c in h.world[W1].calls if c[:2] == ("GET", "/queue"))
        assert queue_reads <= 300 / coordinator_module.QUEUE_MAX_AGE + 2, queue_reads
        for job_id in jobs:
            h.coord.end(job_id, JobState.CANCELLED, "test")
    run(main())


# --- ending a job ------------------------------------------------------------------------------------

def test_ending_a_job_withdraws_every_worker_prompt_and_nothing_else(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W2].prompts and h.world[W1].prompts)
        (ours1,), (ours2,) = h.world[W1].prompts, h.world[W2].prompts
        h.world[W1].pending.remove(ours1)
        h.world[W1].running.append(ours1)           # w1 runs ours
        h.world[W2].running.append("someone-else")  # w2 runs another client's; ours waits
        h.coord.end(job_id, JobState.CANCELLED, "cancelled by the test")
        await h.coord.settle()
        assert ("POST", "/interrupt", {"prompt_id": ours1}) in h.world[W1].calls
        assert not any(c[1] == "/interrupt" for c in h.world[W2].calls), "another client's prompt was interrupted"
        assert ("POST", "/queue", {"delete": [ours2]}) in h.world[W2].calls
        assert h.coord.store.get(job_id) is None and job_id not in h.coord.plans and job_id not in h.coord.wakeups
        assert h.coord.store.recent()[0]["error"] == "cancelled by the test"
    run(main())


def test_a_share_dispatched_while_its_job_ends_is_withdrawn(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        await h.checked()
        h.world[W1].hold_posts = asyncio.Event()
        job_id = await h.started()
        await until(lambda: any(c[:2] == ("POST", "/prompt") for c in h.world[W1].calls))
        h.coord.end(job_id, JobState.CANCELLED, "test")  # while POST /prompt is on its way
        h.world[W1].hold_posts.set()
        await h.coord.settle()
        (late,) = h.world[W1].prompts
        assert ("POST", "/queue", {"delete": [late]}) in h.world[W1].calls
        assert not h.world[W1].pending
    run(main())


def test_a_finished_job_withdraws_nothing(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W1].prompts)
        job = h.coord.store.get(job_id)
        for unit in job.units:
            job.record("4", unit, 1, None)
        h.coord.result_arrived(job_id)
        job.taken.add("4")
        h.coord.end(job_id, JobState.DONE)
        await h.coord.settle()
        assert not any(c[1] in ("/interrupt", "/queue") and c[0] == "POST" for c in h.world[W1].calls)
    run(main())


# --- ComfyUI with the jobs API (0.38) ---------------------------------------------------------------

def test_with_the_jobs_api_a_share_is_watched_by_its_job_and_withdrawn_by_one_cancel(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        h.world[W1].jobs_api = True  # w2 is an older ComfyUI: the queue path, as before
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W2].prompts and h.world[W1].prompts)
        (ours1,), (ours2,) = h.world[W1].prompts, h.world[W2].prompts
        h.world[W1].pending.remove(ours1)
        h.world[W1].running.append(ours1)
        for _ in range(40):
            h.clock.advance(0.5)
            await asyncio.sleep(0)
        assert ("GET", f"/api/jobs/{ours1}", None) in h.world[W1].calls
        assert not any(c[:2] == ("GET", "/queue") or c[1].startswith("/history") for c in h.world[W1].calls)
        h.coord.end(job_id, JobState.CANCELLED, "cancelled by the test")
        await h.coord.settle()
        assert ("POST", f"/api/jobs/{ours1}/cancel", {}) in h.world[W1].calls
        assert not any(c[1] in ("/interrupt", "/queue") and c[0] == "POST" for c in h.world[W1].calls)
        assert ("POST", "/queue", {"delete": [ours2]}) in h.world[W2].calls
    run(main())


def test_with_the_jobs_api_an_error_names_the_node_and_a_forgotten_prompt_fails_over(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True), ("w3", 18191, True)))
        for url in (W1, W2, W3):
            h.world[url].jobs_api = True
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W1].prompts and h.world[W2].prompts)
        (ours1,), (ours2,) = h.world[W1].prompts, h.world[W2].prompts
        h.world[W1].finish(ours1, status="error")
        h.world[W2].pending.remove(ours2)  # the worker restarted: it knows nothing of it
        await until(lambda: len([n for n in h.coord.store.get(job_id).notices if " failed: " in n]) == 2)
        notices = " | ".join(h.coord.store.get(job_id).notices)
        assert "DistributedTestProbe): out of ink" in notices, notices
        assert "no longer has its prompt" in notices, notices
        h.coord.end(job_id, JobState.CANCELLED, "test")
    run(main())


# --- status ----------------------------------------------------------------------------------------

def test_status_reads_the_checks_and_changes_nothing(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, False)))
        h.world[W1].up = False
        await h.checked()
        before = {u: vars(s).copy() for u, s in h.coord.reach.seen.items()}
        rows = {r["id"]: r for r in await h.coord.status(h.config)}
        assert rows["master"]["state"] == "online" and rows["w1"]["state"] == "offline"
        assert "cannot connect" in rows["w1"]["error"] and rows["w2"]["state"] == "disabled"
        h.world[W1].up = True  # a GET does not learn that: only the next check does
        await h.coord.status(h.config)
        assert {u: vars(s) for u, s in h.coord.reach.seen.items()} == before
        assert not any(c for c in h.world[W1].calls)
    run(main())


def test_checks_back_off_for_an_instance_that_stays_down(tmp_path):
    """One that does not answer at all is asked less and less often (one that refuses at once
    costs nothing and keeps the usual pace)."""
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        h.world[W1].up = False
        h.world[W1].refuses = False  # it times out
        checks = 0
        began = h.clock.now()
        while h.clock.now() - began < 120:
            checks += len(h.coord.reach.tick())
            for _ in range(5):
                await asyncio.sleep(0)
            h.clock.advance(0.5)
        master_checks = 120 / 2.0
        assert checks < master_checks + 120 / 10.0 + 6, checks  # the master every 2 s, w1 backing off
    run(main())


def test_withdraw_never_interrupts_a_prompt_that_is_not_ours():
    async def main():
        world = {W1: Instance(W1)}
        world[W1].running.append("theirs")
        world[W1].pending.append("ours")
        client = FakeClient(world, W1)
        await client.withdraw("ours")
        await client.withdraw("gone")
        assert world[W1].calls[-3:] == [("GET", "/queue", None), ("POST", "/queue", {"delete": ["ours"]}),
                                        ("GET", "/queue", None)]
        assert not any(c[1] == "/interrupt" for c in world[W1].calls)
    run(main())


@pytest.mark.parametrize("split", [False, True])
def test_the_master_share_is_put_in_place_on_the_loop(tmp_path, split):
    import numpy as np

    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        await h.checked()
        prompt = split_workflow(batch=4) if split else image_workflow(seed=1, batch=1)
        _data, (job_id,), _r = h.submit(prompt)
        job = h.coord.store.get(job_id)
        own = job.shares["master"].units
        chunks = plan.chunks_of(own) if split else [[u, 1] for u in own]
        arrays = [np.full((count, 2, 2, 3), 0.5, np.float32) for _first, count in chunks]
        await h.coord.local_share(job_id, "4", chunks, arrays)
        assert job.shares["master"].state == "done"
        assert all(job.has("4", u) for u in own)
        h.coord.end(job_id, JobState.CANCELLED, "test")
        with pytest.raises(Exception):
            await h.coord.local_share(job_id, "4", chunks, arrays)  # the job has ended
    run(main())
