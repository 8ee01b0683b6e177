"""Rendering tiles of the Distributed Tiled Upscale on this participant: a batch of tiles as one
img2img sampler run (``render_batch``), batches split and retried when the GPU runs out of memory
(``Renderer``), and a worker's side of a job (``work_for_master``). ComfyUI's sampler, VAE and
memory handling are reached through comfy_internals; no ComfyUI module is imported here."""
from __future__ import annotations

import json
import logging
import time
from typing import Callable

import numpy as np
import torch

from . import comfy_internals, inbox, relay, tiles, wire

log = logging.getLogger("comfyui-distributed")


def as_array(images: torch.Tensor) -> np.ndarray:
    return images.detach().to("cpu", torch.float32).contiguous().numpy()


def render_batch(crops: np.ndarray, seeds: list[int], model, positive, negative, vae, params: dict) -> np.ndarray:
    """Tiles of one padded size, (tiles, h, w, 3), as one img2img batch: VAE-encode them (edge-extended
    to a multiple of 8), sample, decode, and cut back to the region. Each tile's starting noise comes
    from its own seed alone, whichever tiles share its batch."""
    height, width = crops.shape[1:3]
    below, right = tiles.latent_padding(height, width)
    tensor = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    if below or right:
        tensor = torch.nn.functional.pad(tensor.movedim(-1, 1), (0, right, 0, below), mode="replicate").movedim(1, -1)
    # ComfyUI of early 2024 samples the VAE's latent distribution from torch's global CPU generator:
    # there each tile is encoded alone under its own seed, so that its encoding depends neither on
    # what ran before nor on the tiles beside it in the batch.
    sampled = comfy_internals.vae_samples_latent(vae)
    parts = [(tensor[i:i + 1], seed) for i, seed in enumerate(seeds)] if sampled else [(tensor, seeds[0])]
    latents = []
    with torch.random.fork_rng(devices=[]):
        for pixels, seed in parts:
            torch.default_generator.manual_seed(seed)
            latents.append(vae.encode(pixels))
    latent = torch.cat(latents)
    samples = comfy_internals.sample_batch(model, latent, seeds, params, positive, negative)
    decoded = vae.decode(samples)
    if decoded.dim() == 5:  # video VAEs give (batch, frames, h, w, c)
        decoded = decoded.reshape(-1, *decoded.shape[-3:])
    return as_array(decoded[:, :height, :width, :3].clamp(0, 1))


class Renderer:
    """Renders batches of one grid on this participant in parts as large as its GPU has shown to
    hold: a part that runs out of GPU memory is halved and tried again, later batches start at the
    size that fitted, and ``notice`` is told each time. Only a single tile that does not fit fails."""

    def __init__(self, grid, enlarged: np.ndarray, params: dict, models: tuple, notice: Callable[[str], None],
                 check_interrupt: Callable[[], None] = lambda: None):
        self.grid, self.enlarged, self.params, self.models, self.notice = grid, enlarged, params, models, notice
        self.check_interrupt = check_interrupt  # raises where ComfyUI was told to stop
        self.most: int | None = None  # the largest part known to fit, once one did not

    def __call__(self, batch: tuple[int, ...]) -> np.ndarray:
        step = self.most or len(batch)
        parts = [batch[i:i + step] for i in range(0, len(batch), step)]
        rendered = []
        while parts:
            part = parts.pop(0)
            self.check_interrupt()
            try:
                rendered.append(self._render(part))
                continue
            except comfy_internals.out_of_memory_error():
                if len(part) == 1:
                    raise
            # out of the except block, so that the failed attempt's tensors can be freed
            comfy_internals.free_gpu_cache()
            half = (len(part) + 1) // 2
            self.most = half
            parts[:0] = [part[:half], part[half:]]
            self.notice(f"a batch of {len(part)} tiles did not fit in GPU memory: split and retried, batches of "
                        f"at most {half} tiles from now on (a lower tile_batch avoids the retries)")
        return np.concatenate(rendered)

    def _render(self, part: tuple[int, ...]) -> np.ndarray:
        crops = np.stack([self.grid.crop(self.enlarged, index) for index in part])
        seeds = [tiles.tile_seed(self.params["seed"], index) for index in part]
        return render_batch(crops, seeds, *self.models, self.params)


def work_for_master(job: dict, token: str, send: Callable[..., relay.Reply], renderer: Callable[..., Renderer],
                    check_interrupt: Callable[[], None], interrupted: Callable[[], bool], tile_wait: float) -> None:
    """A worker's part of an upscale job: fetch the enlarged image once, then render leased batches
    (``renderer(grid, enlarged, params, notice)`` makes the Renderer) until none are left. ``send``
    is Relays.request for the prompt's share token: every request goes over the prompt's relay."""
    ident = [json.dumps({"job": job["job"], "node": job["node"], "token": token}).encode()]
    patience = float(job.get("timeout", 120))

    def ask(path: str, parts: list, headers: dict | None = None) -> relay.Reply | None:
        """A request to the master, waiting up to ``patience`` seconds for its relay; None when the
        job is over."""
        check_interrupt()
        try:
            reply = send("/distributed/tiles/" + path, parts, headers, time.monotonic() + patience, interrupted)
        except relay.Interrupted:
            check_interrupt()
            raise RuntimeError("Distributed Tiled Upscale: interrupted") from None
        except (TimeoutError, relay.RelayFailed) as exc:
            raise RuntimeError(f"Distributed Tiled Upscale: cannot reach the master: {exc}") from None
        if reply.status == 410:
            return None
        if reply.status >= 400:
            raise RuntimeError(f"Distributed Tiled Upscale: the master answered {reply.status}: {reply.text[:300]}")
        return reply

    while True:  # the enlarged image, once the master has it
        reply = ask("image", ident)
        if reply is None:
            return
        if reply.status == 200:
            break
        _pause(tile_wait, interrupted)
    _header, enlarged = wire.decode(reply.body)
    info = json.loads(reply.headers[inbox.TILE_HEADER])
    grid, params = tiles.Grid.from_dict(info["grid"]), info["params"]
    notices: list[str] = []  # told to the master with the batch they are about
    render = renderer(grid, enlarged, params, notices.append)
    rendered = 0
    while True:
        reply = ask("lease", ident)
        if reply is None:
            break
        answer = reply.json()
        batch = answer.get("batch")
        if batch is None:
            if answer.get("done"):
                break
            _pause(float(answer.get("wait", tile_wait)), interrupted)
            continue
        pixels = render(tuple(answer["tiles"]))
        parts = wire.frame(job["job"], job["node"], batch, 1, token, pixels, "float32")
        headers = {"Content-Type": wire.CONTENT_TYPE}
        if notices:
            headers[inbox.NOTICE_HEADER] = "; ".join(notices)[:inbox.MAX_NOTICE]
            notices.clear()
        if ask("result", parts, headers) is None:
            break
        rendered += len(pixels)
    log.info("[Distributed] rendered %d tiles of upscale job %s", rendered, job["job"][:8])


def _pause(seconds: float, interrupted: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not interrupted() and time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
