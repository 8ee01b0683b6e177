"""The audio that the Multi-GPU Collector gathers beside its images (its optional AUDIO input).

ComfyUI's AUDIO is ``{"waveform": tensor [batch, channels, samples], "sample_rate": int}``. Each
part of a job (one per unit in multiply mode, one per chunk in split mode, exactly like the image
batches) brings one waveform; the parts are joined along the samples axis in the order of the
images, so the gathered audio plays in step with the gathered frames: the master's first, then
each worker's in config order, units in order inside each. Parts keep their batch: every part must
have the same batch size (1 for one track), channel count and sample rate. Nothing here imports
ComfyUI or torch; the node converts tensors to float32 arrays and back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REMEDY = ("Every participant's audio must have the same sample rate, number of channels and batch "
          "size to be joined: make the nodes before the Collector's audio input give one format "
          "(resample or remix it there), and run the same nodes on every instance.")


class AudioError(ValueError):
    """Audio that cannot be gathered; the message names the problem and the remedy."""


@dataclass(frozen=True)
class Sound:
    """One part of the gathered audio: a float32 waveform [batch, channels, samples] and its rate."""
    sample_rate: int
    waveform: np.ndarray
    source: str = ""  # who rendered it and which units, for messages ("worker1, unit 2")

    @property
    def nbytes(self) -> int:
        return int(self.waveform.nbytes)

    def format(self) -> str:
        batch, channels, _samples = self.waveform.shape
        return f"{self.sample_rate} Hz, {channels} channel{'s' * (channels != 1)}, batch {batch}"


def sound(waveform, sample_rate, source: str = "") -> Sound:
    """A Sound from an array-like waveform and its rate, checked; AudioError names what is wrong."""
    array = np.asarray(waveform)
    if array.ndim != 3:
        raise AudioError(f"{source or 'the audio'} has a waveform of shape {list(array.shape)}; AUDIO holds "
                         "a waveform of shape [batch, channels, samples]")
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"{source or 'the audio'} has a waveform of {array.dtype}; AUDIO holds float samples")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise AudioError(f"{source or 'the audio'} has a waveform of shape {list(array.shape)}, with no track "
                         "or no channel")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
        raise AudioError(f"{source or 'the audio'} has the sample rate {sample_rate!r}; it must be a whole "
                         "number of Hz")
    return Sound(int(sample_rate), np.ascontiguousarray(array, dtype=np.float32), source)


def per_part(values: list, parts: int) -> list:
    """One audio value per part (unit or chunk) of a participant, paired with its image batches:
    a single value that does not depend on the part (the same audio for every seed, say) goes with
    every part, as one image batch does."""
    if len(values) == 1 and parts > 1:
        return values * parts
    if len(values) != parts:
        raise AudioError(f"got {len(values)} audio values for {parts} image batches; a node before the audio "
                         "input produces a list of its own, which cannot be paired with the images")
    return values


def check(parts: list[Sound]) -> None:
    """Refuse parts that cannot be joined into one waveform: different sample rates, channel
    counts or batch sizes. The message lists each kind with the parts that have it."""
    problems = []
    for what, key in (("sample rates", lambda s: s.sample_rate), ("channel counts", lambda s: s.waveform.shape[1]),
                      ("batch sizes", lambda s: s.waveform.shape[0])):
        if len({key(p) for p in parts}) > 1:
            problems.append(what)
    if problems:
        groups: dict[str, list[str]] = {}
        for part in parts:
            groups.setdefault(part.format(), []).append(part.source or "a part")
        listed = "; ".join(f"{fmt} from {', '.join(sources)}" for fmt, sources in groups.items())
        raise AudioError(f"the audio parts differ in {' and '.join(problems)}: {listed}. {REMEDY}")


def join(parts: list[Sound]) -> Sound:
    """The parts one after another along the samples axis, in the order given."""
    if not parts:
        raise AudioError("there is no audio to join")
    check(parts)
    if len(parts) == 1:
        return parts[0]
    return Sound(parts[0].sample_rate, np.concatenate([p.waveform for p in parts], axis=2))
