"""Tiled upscale logic on plain values: the grid, seeds, weights and blending (tiles.py), the tile
pool with its leases (upscale.Board) and the worker prompt (workflow.py)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from distributed_core import tiles, workflow
from distributed_core.tiles import Grid, TileError
from distributed_core.upscale import Board, UpscaleJob, UpscaleState, WorkerShare
from distributed_core.vault import Vault
from distributed_core.wire import Rejected


def covered(grid: Grid) -> np.ndarray:
    count = np.zeros((grid.frames, grid.height, grid.width), dtype=int)
    for t in grid.tiles():
        count[t.frame, t.y0:t.y1, t.x0:t.x1] += 1
    return count


@pytest.mark.parametrize("frames,height,width,tw,th,pad", [
    (1, 128, 128, 48, 48, 16), (3, 100, 70, 32, 48, 8), (1, 64, 64, 64, 64, 32), (2, 17, 9, 8, 16, 0)])
def test_cores_cover_every_pixel_of_every_frame_once(frames, height, width, tw, th, pad):
    grid = Grid(frames, height, width, tw, th, pad, 4)
    assert (covered(grid) == 1).all()
    assert len(grid) == frames * -(-height // th) * -(-width // tw)
    for t in grid.tiles():
        assert 0 <= t.px0 <= t.x0 < t.x1 <= t.px1 <= width and 0 <= t.py0 <= t.y0 < t.y1 <= t.py1 <= height
        # every tile renders at one size: its context is taken from inside the image at the edges
        assert (t.py1 - t.py0, t.px1 - t.px0) == grid.padded_shape == (min(th + 2 * pad, height),
                                                                        min(tw + 2 * pad, width))
        assert t.x0 - t.px0 >= min(pad, t.x0) and t.px1 - t.x1 >= min(pad, width - t.x1)


def test_an_edge_tile_takes_its_context_from_inside_the_image():
    grid = Grid(1, 100, 70, 32, 32, 8, 8)  # the last column's core is 6 px wide
    first, last = grid.tile(0), grid.tile(2)
    assert (first.px0, first.px1) == (0, 48) and (first.py0, first.py1) == (0, 48)
    assert (last.x0, last.x1) == (64, 70) and (last.px0, last.px1) == (22, 70)
    middle = grid.tile(4)  # padded 8 px above and below; its 8 px on the right would leave the image
    assert (middle.py0, middle.py1) == (24, 72) and (middle.px0, middle.px1) == (22, 70)


def test_index_counts_frame_then_row_then_column():
    grid = Grid(2, 96, 128, 64, 48, 0, 0)  # 2 columns, 2 rows per frame
    assert [(t.frame, t.y0, t.x0) for t in grid.tiles()] == [
        (0, 0, 0), (0, 0, 64), (0, 48, 0), (0, 48, 64), (1, 0, 0), (1, 0, 64), (1, 48, 0), (1, 48, 64)]
    assert grid.tile(3).x1 == 128  # the last column is cut to the image


def test_an_uneven_image_gets_smaller_last_tiles():
    grid = Grid(1, 100, 70, 32, 32, 8, 8)
    assert (grid.columns, grid.rows) == (3, 4)
    assert grid.tile(2).x1 - grid.tile(2).x0 == 6 and grid.tile(11).y1 - grid.tile(11).y0 == 4


@pytest.mark.parametrize("bad", [dict(tile_width=0), dict(padding=-1), dict(blur=1.5), dict(frames=True)])
def test_bad_geometry_is_named(bad):
    values = dict(frames=1, height=64, width=64, tile_width=32, tile_height=32, padding=8, blur=4) | bad
    with pytest.raises(TileError, match=next(iter(bad))):
        Grid(**values)


def test_tile_seeds_depend_on_seed_and_index_only_and_differ():
    seeds = [tiles.tile_seed(1234, i) for i in range(1000)]
    assert seeds == [tiles.tile_seed(1234, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 1 << 64 for s in seeds)
    assert tiles.tile_seed(1235, 0) != tiles.tile_seed(1234, 1)  # neighbouring seeds are not shifted copies
    assert tiles.tile_seed((1 << 64) - 1, 5) < 1 << 64


def test_weights_are_one_on_the_core_and_fade_over_the_blur():
    grid = Grid(1, 96, 96, 32, 32, 8, 4)
    t = grid.tile(4)  # the middle tile: padded on every side
    w = grid.weights(4)
    assert w.shape == t.padded_shape
    core = w[t.y0 - t.py0:t.y1 - t.py0, t.x0 - t.px0:t.x1 - t.px0]
    assert (core == 1).all()
    row = w[t.y0 - t.py0 + 5]
    assert list(np.round(row[:8], 3)) == [0, 0, 0, 0, 0.2, 0.4, 0.6, 0.8]
    hard = Grid(1, 96, 96, 32, 32, 8, 0).weights(4)
    assert set(np.unique(hard)) == {0.0, 1.0} and hard.sum() == 32 * 32


def test_blend_of_identical_tiles_gives_the_image_back_and_ignores_arrival_order():
    rng = np.random.default_rng(0)
    image = rng.random((2, 50, 70, 3), dtype=np.float32)
    grid = Grid(2, 50, 70, 32, 24, 8, 6)
    crops = {i: grid.crop(image, i).copy() for i in range(len(grid))}
    assert np.allclose(grid.blend(crops, 3), image, atol=1e-6)
    # tiles that disagree: the blend is a weighted mean that does not depend on the dict's order
    noisy = {i: (crops[i] + rng.normal(0, 0.05, crops[i].shape)).astype(np.float32) for i in crops}
    backwards = {i: noisy[i] for i in sorted(noisy, reverse=True)}
    assert np.array_equal(grid.blend(noisy, 3), grid.blend(backwards, 3))


def test_blend_names_missing_and_misshapen_tiles():
    grid = Grid(1, 64, 64, 32, 32, 8, 4)
    image = np.zeros((1, 64, 64, 3), dtype=np.float32)
    crops = {i: grid.crop(image, i) for i in range(len(grid))}
    with pytest.raises(TileError, match="missing"):
        grid.blend({i: c for i, c in crops.items() if i != 2}, 3)
    with pytest.raises(TileError, match="tile 1"):
        grid.blend({**crops, 1: crops[1][:-1]}, 3)


def test_latent_padding_and_enlarged_size():
    assert tiles.latent_padding(40, 33) == (0, 7)
    assert tiles.enlarged_size(64, 48, 2) == (128, 96)
    assert tiles.enlarged_size(33, 33, 1.5) == (50, 50)
    with pytest.raises(TileError):
        tiles.enlarged_size(8, 8, 0)


@pytest.mark.parametrize("count,size", [(16, 8), (27, 4), (5, 1), (3, 8), (64, 8)])
def test_batches_cover_every_tile_once_in_order(count, size):
    found = tiles.batches(count, size)
    assert [i for batch in found for i in batch] == list(range(count))
    assert all(len(batch) == size for batch in found[:-1]) and 1 <= len(found[-1]) <= size
    assert found == tiles.batches(count, size)  # nothing else goes into them


def test_frames_share_batches():
    grid = Grid(3, 128, 128, 48, 48, 16, 8)  # 9 tiles a frame
    frames_in = [{grid.tile(i).frame for i in batch} for batch in tiles.batches(len(grid), 4)]
    assert frames_in[2] == {0, 1} and frames_in[4] == {1, 2} and len(frames_in) == 7


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_a_bad_tile_batch_is_named(bad):
    with pytest.raises(TileError, match="tile_batch must be a whole number >= 1"):
        tiles.batches(16, bad)


def test_grid_round_trips_through_json():
    grid = Grid(3, 100, 70, 32, 48, 8, 2)
    assert Grid.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid


# --- the pool ------------------------------------------------------------------------------------

def board_with_job(workers=("w1", "w2"), tile_batch=1, size=64) -> tuple[Board, UpscaleJob, Grid]:
    board = Board()
    job = UpscaleJob(id="job1", prompt={}, nodes=["9"], config=None)
    for w in workers:
        job.workers[w] = WorkerShare(w, w)
    board.add(job)
    grid = Grid(1, size, size, 32, 32, 8, 4)
    assert board.publish("job1", "9", np.zeros((1, size, size, 3), np.float32), grid, {"seed": 1}, tile_batch)
    return board, job, grid


def pixels(count: int, value: float = 1.0) -> np.ndarray:
    return np.full((count, 48, 48, 3), value, np.float32)


def test_leases_hand_out_each_batch_once_then_let_idle_participants_share_overdue_ones():
    board, job, grid = board_with_job()
    token = job.workers["w1"].token
    first = [board.lease("job1", "9", "", 60, token=token).batch for _ in range(2)]
    assert first == [0, 1]
    assert board.lease("job1", "9", "master", 60).batch == 2
    assert board.lease("job1", "9", "master", 60).batch == 3
    # pool empty, and no batch has finished yet: nothing counts as overdue, so the master waits
    assert board.lease("job1", "9", "master", 60).kind == "wait"
    assert board.complete("job1", "9", 2, "master", pixels(1))  # a batch takes ~0 s
    time.sleep(0.01)
    assert board.lease("job1", "9", "master", 60).batch == 0  # w1's batches are overdue: longest-held first
    assert board.lease("job1", "9", "", 60, token=job.workers["w2"].token).batch == 1  # batch 0 has two holders
    assert board.complete("job1", "9", 0, "master", pixels(1))
    assert not board.complete("job1", "9", 0, "w1", pixels(1, 0.0))  # first wins


def test_a_batch_is_leased_and_delivered_whole():
    board, job, grid = board_with_job(tile_batch=4, size=96)  # 9 tiles: batches of 4, 4 and 1
    leases = [board.lease("job1", "9", "master", 60) for _ in range(3)]
    assert [(lease.batch, lease.tiles) for lease in leases] == [(0, (0, 1, 2, 3)), (1, (4, 5, 6, 7)), (2, (8,))]
    assert board.expected_shape("job1", "9", job.workers["w1"].token, 1) == ("w1", (4, 48, 48, 3))
    with pytest.raises(Rejected, match="holds 4 tiles, not 3"):
        board.complete("job1", "9", 1, "master", pixels(3))
    with pytest.raises(Rejected, match="batch 3 is not a batch"):
        board.complete("job1", "9", 3, "master", pixels(1))
    for lease in leases:
        board.complete("job1", "9", lease.batch, "master", pixels(len(lease.tiles), lease.batch))
    results = board.results("job1", "9")
    assert sorted(results) == list(range(9)) and results[5][0, 0, 0] == 1 and results[8][0, 0, 0] == 2


def test_a_worker_gone_mid_batch_gives_the_whole_batch_back():
    board, job, grid = board_with_job(tile_batch=4, size=96)
    assert board.lease("job1", "9", "", 60, token=job.workers["w1"].token).tiles == (0, 1, 2, 3)
    assert board.lease("job1", "9", "master", 60).tiles == (4, 5, 6, 7)
    board.release("job1", "w1", "its process died")
    again = board.lease("job1", "9", "master", 60)
    assert (again.batch, again.tiles) == (0, (0, 1, 2, 3))


def test_notices_name_the_participant_once():
    board, job, grid = board_with_job()
    participant, _shape = board.expected_shape("job1", "9", job.workers["w2"].token, 0)
    board.notice("job1", participant, "a batch of 8 tiles did not fit")
    board.notice("job1", participant, "a batch of 8 tiles did not fit")
    board.notice("job1", "master", "a batch of 8 tiles did not fit")
    assert job.notices == ["w2: a batch of 8 tiles did not fit", "master: a batch of 8 tiles did not fit"]


def test_expired_and_released_leases_go_back_to_the_pool():
    board, job, grid = board_with_job()
    t1, t2 = job.workers["w1"].token, job.workers["w2"].token
    assert board.lease("job1", "9", "", 0.05, token=t1).batch == 0
    assert board.lease("job1", "9", "", 60, token=t2).batch == 1
    time.sleep(0.1)
    assert board.lease("job1", "9", "master", 60).batch == 0  # w1's lease ran out
    board.release("job1", "w2", "its prompt failed")
    assert board.lease("job1", "9", "master", 60).batch == 1
    assert job.workers["w2"].state == "failed" and "w2 failed: its prompt failed" in job.notices
    with pytest.raises(Rejected) as refused:
        board.lease("job1", "9", "", 60, token=t2)
    assert refused.value.status == 410


def test_done_once_every_tile_is_in_and_the_results_are_complete():
    board, job, grid = board_with_job(workers=("w1",), tile_batch=3)
    while (lease := board.lease("job1", "9", "master", 60)).kind == "batch":
        board.complete("job1", "9", lease.batch, "master", pixels(len(lease.tiles), lease.batch))
    assert lease.kind == "done"
    assert board.lease("job1", "9", "", 60, token=job.workers["w1"].token).kind == "done"
    assert sorted(board.results("job1", "9")) == list(range(len(grid)))
    assert job.summary()["done"] == len(grid) and job.summary()["units"] == len(grid)
    board.node_done("job1", "9")
    assert board.get("job1") is None and job.state is UpscaleState.DONE
    with pytest.raises(Rejected) as gone:
        board.image("job1", "9", job.workers["w1"].token)
    assert gone.value.status == 410


def test_tokens_are_checked():
    board, job, _grid = board_with_job()
    for token in ("", "forged", job.workers["w1"].token + "x", "\ud800abc", None):
        with pytest.raises(Rejected) as refused:
            board.image("job1", "9", token)
        assert refused.value.status == 403
    with pytest.raises(Rejected) as unknown:
        board.image("job2", "9", job.workers["w1"].token)
    assert unknown.value.status == 404
    assert board.expected_shape("job1", "9", job.workers["w2"].token, 3) == ("w2", (1, 48, 48, 3))


def test_ending_a_job_calls_back_once():
    board, job, _grid = board_with_job()
    ended = []
    board.on_end = ended.append
    board.end("job1", UpscaleState.CANCELLED, "interrupted")
    board.end("job1", UpscaleState.CANCELLED, "again")
    assert ended == [job] and job.error == "interrupted"
    assert all(w.state == "cancelled" for w in job.workers.values())


# --- the prompts ---------------------------------------------------------------------------------

def upscale_prompt() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "b", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "5": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}},
        "6": {"class_type": "DistributedTiledUpscale", "inputs": {
            "image": ["4", 0], "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2],
            "upscale_model": ["5", 0], "seed": 3, "steps": 2}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "up"}},
    }


def test_worker_prompt_holds_the_models_not_the_image_or_the_upscale_model():
    prompt = upscale_prompt()
    result = workflow.upscale_worker_prompt(prompt, ["6"], {"job": "j", "token": "t"})
    assert {"1", "2", "3", "6"} <= set(result) and not {"4", "5", "7"} & set(result)
    node = result["6"]["inputs"]
    assert "upscale_model" not in node
    placeholder = node["image"][0]
    assert result[placeholder]["class_type"] == "EmptyImage"
    assert workflow.read_field(result, "6") == {"job": "j", "token": "t", "role": "worker", "node": "6"}
    assert workflow.fresh_upscales(prompt) == ["6"] and workflow.fresh_upscales(result) == []


def test_worker_role_prompts_are_dispatched_with_their_token_sealed():
    result = workflow.upscale_worker_prompt(upscale_prompt(), ["6"], {"job": "j", "token": "secret-token"})
    kind, screened = workflow.screen(result)
    assert kind == "dispatch"
    vault = Vault()
    sealed = vault.seal(screened)
    key = workflow.read_field(sealed, "6")["sealed"]
    vault.bind([key], "queued-id")
    assert "secret-token" not in json.dumps(sealed)
    assert vault.take(key, "queued-id") == "secret-token"


def test_a_master_role_field_from_a_client_is_stripped():
    prompt = upscale_prompt()
    prompt["6"]["inputs"][workflow.FIELD] = json.dumps({"role": "master", "job": "other"})
    kind, screened = workflow.screen(prompt)
    assert kind == "stripped" and workflow.fresh_upscales(screened) == ["6"]


def test_an_upscale_before_a_collector_is_refused_with_a_remedy():
    prompt = upscale_prompt()
    prompt["8"] = {"class_type": "MultiGPUCollector", "inputs": {"images": ["6", 0]}}
    with pytest.raises(workflow.WorkflowError, match="put it after the Collector"):
        workflow.check_upscales(prompt, ["6"])
    workflow.check_upscales(upscale_prompt(), ["6"])


def test_a_finished_job_takes_back_only_workers_that_never_started():
    board, job, _grid = board_with_job()
    board.image("job1", "9", job.workers["w1"].token)  # w1 fetched the image and works; w2 is still queued
    board.end("job1", UpscaleState.DONE)
    assert job.workers["w1"].state == "done" and job.workers["w2"].state == "cancelled"
