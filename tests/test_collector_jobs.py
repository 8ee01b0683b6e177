"""Collector jobs (distributed_core/collector_jobs.py) decided on plain values, with fake
ComfyUIs and a fake clock (tests/fleet_fakes.py): who is planned in, where a failed share goes,
what ending a job withdraws. The same behaviours run against real servers in the end-to-end tests."""
from __future__ import annotations

import asyncio

import pytest

from distributed_core import plan
from distributed_core.jobs import JobState
from fleet_fakes import W1, W2, W3, Harness, config_with, run, until, units_of
from harness import image_workflow, split_workflow


# --- planning ------------------------------------------------------------------------------------

def test_a_worker_known_to_be_down_is_planned_out_and_its_slot_kept(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        h.world[W2].up = False
        await h.checked()
        _data, (job_id,), refusals = h.submit(image_workflow(seed=10, batch=1))
        job = h.jobs.store.get(job_id)
        assert not refusals
        assert job.units == [0, 1, 2]  # the seed slots stay: w1 keeps offset 1
        assert {p: s.units for p, s in job.shares.items()} == {"master": [0, 2], "w1": [1]}
        assert any("w2" in n and W2 in n and "unreachable" in n for n in job.notices), job.notices
        h.jobs.end(job_id, JobState.CANCELLED, "test")
    run(main())


def test_a_worker_with_no_answer_yet_is_tried(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True)))
        h.world[W2].up = False  # but no check has run yet
        _data, (job_id,), _r = h.submit(image_workflow(seed=10, batch=1))
        job = h.jobs.store.get(job_id)
        assert set(job.shares) == {"master", "w1", "w2"} and not job.notices
        await h.jobs.start(job_id, "")
        # its dispatch is refused: it is known down at once and its unit goes to w1
        await until(lambda: len(h.world[W1].prompts) == 2)
        assert sorted(units_of(p) for p in h.worker_prompts(W1)) == [[1], [2]]
        assert h.fleet.reach.is_down(W2)
        assert any("w2 failed" in n for n in job.notices)
        h.jobs.end(job_id, JobState.CANCELLED, "test")
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
        assert not h.jobs.store.active()
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
        job = h.jobs.store.get(job_id)
        assert job.shares["w2"].state == "failed"
        rescue = [s for key, s in job.shares.items() if key.startswith("w1#")]
        assert [s.label for s in rescue] == ["w1 (for w2)"]  # the rescued slot says whose it was
        h.jobs.end(job_id, JobState.CANCELLED, "test")
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
        h.jobs.end(job_id, JobState.CANCELLED, "test")
        # disabled counts as removed: nobody is left, so the job fails and says why
        h.config = config_with(("w1", 18189, False), ("w2", 18190, True))
        _data, (job_id,), _r = h.submit(image_workflow(seed=10, batch=1))
        h.config = config_with(("w1", 18189, False), ("w2", 18190, True))
        await h.jobs.start(job_id, "")
        await until(lambda: any(job_id in str(p) for p in h.worker_prompts(W2)))
        failing = next(pid for pid, p in h.world[W2].prompts.items() if job_id in str(p))
        h.world[W2].finish(failing, status="error")
        await until(lambda: h.jobs.store.get(job_id).state is JobState.FAILED)
        assert "No other worker is left" in h.jobs.store.get(job_id).error
        h.jobs.end(job_id, JobState.FAILED)
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
        h.jobs.end(job_id, JobState.CANCELLED, "cancelled by the test")
        await h.fleet.settle()
        assert ("POST", "/interrupt", {"prompt_id": ours1}) in h.world[W1].calls
        assert not any(c[1] == "/interrupt" for c in h.world[W2].calls), "another client's prompt was interrupted"
        assert ("POST", "/queue", {"delete": [ours2]}) in h.world[W2].calls
        assert h.jobs.store.get(job_id) is None and job_id not in h.jobs.plans and job_id not in h.fleet.watcher.wakeups
        assert h.jobs.store.recent()[0]["error"] == "cancelled by the test"
    run(main())


def test_a_share_dispatched_while_its_job_ends_is_withdrawn(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        await h.checked()
        h.world[W1].hold_posts = asyncio.Event()
        job_id = await h.started()
        await until(lambda: any(c[:2] == ("POST", "/prompt") for c in h.world[W1].calls))
        h.jobs.end(job_id, JobState.CANCELLED, "test")  # while POST /prompt is on its way
        h.world[W1].hold_posts.set()
        await h.fleet.settle()
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
        job = h.jobs.store.get(job_id)
        for unit in job.units:
            job.record("4", unit, 1, None)
        h.fleet.watcher.wake(job_id)
        job.taken.add("4")
        h.jobs.end(job_id, JobState.DONE)
        await h.fleet.settle()
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
        h.jobs.end(job_id, JobState.CANCELLED, "cancelled by the test")
        await h.fleet.settle()
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
        await until(lambda: len([n for n in h.jobs.store.get(job_id).notices if " failed: " in n]) == 2)
        notices = " | ".join(h.jobs.store.get(job_id).notices)
        assert "DistributedTestProbe): out of ink" in notices, notices
        assert "no longer has its prompt" in notices, notices
        h.jobs.end(job_id, JobState.CANCELLED, "test")
    run(main())




@pytest.mark.parametrize("split", [False, True])
def test_the_master_share_is_put_in_place_on_the_loop(tmp_path, split):
    import numpy as np

    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        await h.checked()
        prompt = split_workflow(batch=4) if split else image_workflow(seed=1, batch=1)
        _data, (job_id,), _r = h.submit(prompt)
        job = h.jobs.store.get(job_id)
        own = job.shares["master"].units
        chunks = plan.chunks_of(own) if split else [[u, 1] for u in own]
        arrays = [np.full((count, 2, 2, 3), 0.5, np.float32) for _first, count in chunks]
        await h.jobs.local_share(job_id, "4", chunks, arrays)
        assert job.shares["master"].state == "done"
        assert all(job.has("4", u) for u in own)
        h.jobs.end(job_id, JobState.CANCELLED, "test")
        with pytest.raises(Exception):
            await h.jobs.local_share(job_id, "4", chunks, arrays)  # the job has ended
    run(main())


def test_a_share_shows_running_once_its_prompt_runs_there(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True)))
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W1].prompts)
        (prompt_id,) = h.world[W1].prompts
        await until(lambda: h.jobs.store.get(job_id).shares["w1"].state == "queued")
        h.world[W1].pending.remove(prompt_id)
        h.world[W1].running.append(prompt_id)  # ComfyUI took it from its queue
        await until(lambda: h.jobs.store.get(job_id).shares["w1"].state == "running")
        h.jobs.end(job_id, JobState.CANCELLED, "test")
    run(main())


def test_notices_say_who_renders_a_failed_workers_images_and_that_the_job_goes_on(tmp_path):
    async def main():
        h = Harness(tmp_path, config_with(("w1", 18189, True), ("w2", 18190, True), ("w3", 18191, True)))
        h.world[W3].up = False
        await h.checked()
        job_id = await h.started()
        await until(lambda: h.world[W2].prompts and h.world[W1].prompts)
        (failing,) = h.world[W2].prompts
        h.world[W2].finish(failing, status="error")
        await until(lambda: len(h.world[W1].prompts) == 2)
        notices = h.jobs.store.get(job_id).notices
        assert any(n.startswith("w3 (http://127.0.0.1:18191) was left out, unreachable: ")
                   and n.endswith("The others render its images; the job goes on.") for n in notices), notices
        assert "w1 renders w2's images instead; the job goes on." in notices, notices
        h.jobs.end(job_id, JobState.CANCELLED, "test")
    run(main())
