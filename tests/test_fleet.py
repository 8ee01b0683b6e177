"""The fleet (distributed_core/fleet.py and watch.py) on plain values, with fake ComfyUIs and a
fake clock (tests/fleet_fakes.py): how a worker's prompt is watched, what status and the checks
cost, and withdrawing. The same behaviours run against real servers in the end-to-end tests."""
from __future__ import annotations

import asyncio
import json

from distributed_core import watch
from distributed_core.jobs import JobState
from fleet_fakes import W1, W2, FakeClient, Harness, Instance, config_with, run, until

def test_a_worker_whose_checks_are_refused_is_failed_over(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W2].prompts and h.world[W1].prompts)
        h.world[W2].up = False  # its process died: checks are refused
        for _ in range(watch.REFUSALS_MEAN_GONE):
            h.clock.advance(10)
            await h.checked()
        await until(lambda: len(h.world[W1].prompts) == 2)
        assert "gone" in h.jobs.store.get(job_id).shares["w2"].error
        h.jobs.end(job_id, JobState.CANCELLED, "test")
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
        assert not any(n for j in jobs for n in h.jobs.store.get(j).notices)
        queue_reads = sum(1 for c in h.world[W1].calls if c[:2] == ("GET", "/queue"))
        assert queue_reads <= 300 / watch.QUEUE_MAX_AGE + 2, queue_reads
        for job_id in jobs:
            h.jobs.end(job_id, JobState.CANCELLED, "test")
    run(main())



# --- status ----------------------------------------------------------------------------------------

def test_status_reads_the_checks_and_changes_nothing(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, False)))
        h.world[W1].up = False
        await h.checked()
        before = {u: vars(s).copy() for u, s in h.fleet.reach.seen.items()}
        rows = {r["id"]: r for r in await h.fleet.status(h.config)}
        assert rows["master"]["state"] == "online" and rows["w1"]["state"] == "offline"
        assert "cannot connect" in rows["w1"]["error"] and rows["w2"]["state"] == "disabled"
        h.world[W1].up = True  # a GET does not learn that: only the next check does
        await h.fleet.status(h.config)
        assert {u: vars(s) for u, s in h.fleet.reach.seen.items()} == before
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
            checks += len(h.fleet.reach.tick())
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


# --- step progress ---------------------------------------------------------------------------------

def progress(prompt_id: str | None, step: int, steps: int) -> str:
    data = {"value": step, "max": steps, "node": "3"} | ({"prompt_id": prompt_id} if prompt_id else {})
    return json.dumps({"type": "progress", "data": data})


def test_steps_are_read_from_comfyuis_progress_events_of_that_prompt_only():
    assert watch.steps_of(progress("p1", 3, 20), "p1") == (3, 20)
    assert watch.steps_of(progress(None, 3, 20), "p1") == (3, 20)  # ComfyUI of early 2024 names no prompt
    assert watch.steps_of(progress("p2", 3, 20), "p1") is None
    for other in ('{"type": "status", "data": {}}', "not json", '{"type": "progress", "data": {"value": 1}}',
                  progress("p1", 1, 0), '[1, 2]'):
        assert watch.steps_of(other, "p1") is None, other


def test_a_workers_step_progress_reaches_its_share_a_few_times_a_second(tmp_path):
    """The master opens the worker's own websocket under the client id its share's prompt was
    queued with, and passes the steps of that prompt on, at most every STEPS_EVERY seconds, the
    last step always."""
    from distributed_core.collector_jobs import STEPS_EVERY

    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W1].prompts)
        [prompt_id] = h.world[W1].prompts
        share = h.jobs.store.get(job_id).shares["w1"]
        await until(lambda: any(c[:2] == ("WS", "/ws") for c in h.world[W1].calls))
        posted = [c[2] for c in h.world[W1].calls if c[:2] == ("POST", "/prompt")]
        opened = [c[2] for c in h.world[W1].calls if c[:2] == ("WS", "/ws")]
        assert [p["client_id"] for p in posted] == [share.client_id] and opened == [share.client_id]
        events = h.world[W1].events
        events += [progress(prompt_id, 1, 20), progress(prompt_id, 2, 20), progress("another", 9, 9)]
        await until(lambda: share.steps == [1, 20])
        for _ in range(50):
            await asyncio.sleep(0)
        assert share.steps == [1, 20]  # the second came too soon after; the other prompt's is not ours
        h.clock.advance(STEPS_EVERY)
        events.append(progress(prompt_id, 5, 20))
        await until(lambda: share.steps == [5, 20])
        events.append(progress(prompt_id, 20, 20))
        await until(lambda: share.steps == [20, 20])
        assert h.jobs.store.get(job_id).summary()["shares"][1]["steps"] == [20, 20]
        h.jobs.end(job_id, JobState.CANCELLED, "test")
    run(main())
