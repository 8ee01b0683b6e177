"""The result frame a worker sends to the master: a small header, then the raw tensor bytes.

    MAGIC (4 bytes) | header length (4 bytes, big-endian) | header (UTF-8 JSON) | payload

Encodings: ``raw`` (float32 is lossless, uint8 keeps what a PNG keeps at a quarter of the bytes) and
``png`` (uint8 images as PNGs, each behind its 4-byte length: compact, for slow links to remote
workers). The receiver checks every PNG's size against the header before decoding it, so a
decompression bomb is refused unread.

The header names the job, the Collector, the first unit and how many units the frame covers (one
seed slot in multiply mode; a range of global batch indices in split mode), the per-job token, the
dtype and the shape of an IMAGE batch (batch, height, width, channels). The payload is the array in C order, exactly
``prod(shape) * itemsize`` bytes, so the receiver can size its buffer from the header and stream the
body straight into it. No base64, no JSON-wrapped PNG.

A frame may also carry the audio that goes with its images (the Collector's optional AUDIO input):
then its header holds ``"audio": {"sample_rate": int, "shape": [batch, channels, samples]}`` and the
waveform follows the images as float32 in C order, whatever the transport. A frame without that key
carries no audio and is byte for byte what earlier versions sent; a master of an earlier version
refuses a frame with audio (its body is longer than the header it knows promises), so audio is
never dropped unseen.
"""
from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass

import numpy as np

MAGIC = b"CDR1"
PREFIX_SIZE = 8
MAX_HEADER = 16 * 1024
MAX_SIDE = 16384
MAX_BATCH = 4096
MAX_SAMPLE_RATE = 1 << 22   # Hz; far above any audio format in use
MAX_AUDIO_CHANNELS = 64
MAX_AUDIO_SAMPLES = (1 << 31) - 1
ENCODINGS = ("raw", "png")
TRANSPORTS = ("float32", "uint8", "png")   # what a worker sends: dtype and encoding together
DTYPES = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}
CONTENT_TYPE = "application/x-comfyui-distributed-result"


class FrameError(ValueError):
    """The frame is malformed; the message says how."""


@dataclass(frozen=True)
class Header:
    job: str
    collector: str
    unit: int
    token: str
    dtype: str
    shape: tuple[int, int, int, int]
    count: int = 1
    encoding: str = "raw"
    nbytes: int = 0  # payload bytes of an encoded (png) frame; raw frames follow from the shape
    # (sample rate, (batch, channels, samples)) of the float32 waveform after the images, or None
    audio: tuple[int, tuple[int, int, int]] | None = None

    @property
    def raw_size(self) -> int:
        return math.prod(self.shape) * np.dtype(DTYPES[self.dtype]).itemsize

    @property
    def image_size(self) -> int:
        """Payload bytes of the images: the first part of the payload."""
        return self.raw_size if self.encoding == "raw" else self.nbytes

    @property
    def audio_size(self) -> int:
        """Payload bytes of the waveform after the images (0 without audio)."""
        return 0 if self.audio is None else math.prod(self.audio[1]) * 4

    @property
    def payload_size(self) -> int:
        return self.image_size + self.audio_size

    def to_bytes(self) -> bytes:
        data = {"job": self.job, "collector": self.collector, "unit": self.unit, "count": self.count,
                "token": self.token, "dtype": self.dtype, "shape": list(self.shape), "encoding": self.encoding,
                "nbytes": self.nbytes}
        if self.audio is not None:
            data["audio"] = {"sample_rate": self.audio[0], "shape": list(self.audio[1])}
        body = json.dumps(data, separators=(",", ":")).encode()
        return MAGIC + len(body).to_bytes(4, "big") + body


def header_length(prefix: bytes) -> int:
    if len(prefix) != PREFIX_SIZE or prefix[:4] != MAGIC:
        raise FrameError("not a result frame (bad magic); is the worker running the same extension version?")
    size = int.from_bytes(prefix[4:], "big")
    if not 2 <= size <= MAX_HEADER:
        raise FrameError(f"header length {size} is outside 2..{MAX_HEADER}")
    return size


def _check_name(data: dict, key: str) -> None:
    """A header's id or token: text of 1 to 128 characters that UTF-8 can hold. JSON can spell a
    lone surrogate (\\ud800), which is no character and cannot be encoded or compared as one."""
    value = data.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise FrameError(f"header.{key} must be a non-empty string of at most 128 characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError(f"header.{key} holds a lone surrogate (a \\ud800 to \\udfff escape that is not half of a "
                         "pair), which is not text; send the value the master gave") from None


def same_token(given: object, expected: str) -> bool:
    """Whether a token a request carries is the one given out, in constant time; any value, even
    text that UTF-8 cannot encode, is compared without raising."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def parse_header(raw: bytes) -> Header:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FrameError("header must be a JSON object")
    for key in ("job", "collector", "token"):
        _check_name(data, key)
    unit = data.get("unit")
    if not isinstance(unit, int) or isinstance(unit, bool) or not 0 <= unit < 1 << 20:
        raise FrameError("header.unit must be a whole number >= 0")
    count = data.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_BATCH:
        raise FrameError(f"header.count must be a whole number from 1 to {MAX_BATCH}")
    if data.get("dtype") not in DTYPES:
        raise FrameError(f"header.dtype must be one of {', '.join(DTYPES)}")
    shape = data.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise FrameError("header.shape must be [batch, height, width, channels]")
    batch, height, width, channels = shape
    if not (1 <= batch <= MAX_BATCH and 1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE
            and 1 <= channels <= 4):
        raise FrameError(f"header.shape {shape} is out of range (1 to {MAX_BATCH} images, "
                         f"sides <= {MAX_SIDE}, 1 to 4 channels)")
    if batch % count:
        raise FrameError(f"header.shape holds {batch} images for {count} units; every unit has as many images")
    encoding = data.get("encoding", "raw")
    if encoding not in ENCODINGS:
        raise FrameError(f"header.encoding must be one of {', '.join(ENCODINGS)}")
    nbytes = data.get("nbytes", 0)
    if encoding == "png":
        # a PNG is never much larger than its pixels: refuse a body that could not be one
        limit = math.prod(shape) + 1024 * (batch + 1)
        if data["dtype"] != "uint8" or not isinstance(nbytes, int) or not 0 < nbytes <= limit:
            raise FrameError(f"a png frame holds uint8 images in at most {limit} bytes")
    return Header(data["job"], data["collector"], unit, data["token"], data["dtype"], tuple(shape), count,
                  encoding, nbytes if encoding == "png" else 0, _parse_audio(data.get("audio")))


def _parse_audio(audio) -> tuple[int, tuple[int, int, int]] | None:
    if audio is None:
        return None
    if not isinstance(audio, dict):
        raise FrameError("header.audio must be an object {sample_rate, shape}")
    rate, shape = audio.get("sample_rate"), audio.get("shape")
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= MAX_SAMPLE_RATE:
        raise FrameError(f"header.audio.sample_rate must be a whole number from 1 to {MAX_SAMPLE_RATE}")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise FrameError("header.audio.shape must be [batch, channels, samples]")
    batch, channels, samples = shape
    if not (1 <= batch <= MAX_BATCH and 1 <= channels <= MAX_AUDIO_CHANNELS and 0 <= samples <= MAX_AUDIO_SAMPLES):
        raise FrameError(f"header.audio.shape {shape} is out of range (1 to {MAX_BATCH} waveforms of 1 to "
                         f"{MAX_AUDIO_CHANNELS} channels, at most {MAX_AUDIO_SAMPLES} samples)")
    return rate, (batch, channels, samples)


def _audio_parts(header: Header, sound) -> list:
    """The waveform's buffer for a header that declares it (nothing without audio)."""
    if sound is None:
        if header.audio is not None:
            raise FrameError("the header declares audio but none was given")
        return []
    waveform, rate = sound
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    if header.audio != (rate, tuple(waveform.shape)):
        raise FrameError("the waveform does not match its header")
    return [memoryview(waveform.reshape(-1).view(np.uint8))]


def _audio_header(sound) -> tuple[int, tuple[int, int, int]] | None:
    if sound is None:
        return None
    waveform, rate = sound
    shape = tuple(int(d) for d in np.shape(waveform))
    if len(shape) != 3:
        raise FrameError(f"a waveform is [batch, channels, samples], not of shape {list(shape)}")
    return int(rate), shape


def encode(header: Header, array: np.ndarray, sound=None) -> list:
    """The frame as a list of buffers (header, then the array's memory, uncopied, then the
    waveform's when ``sound`` = (float32 waveform, sample rate) is given)."""
    array = np.ascontiguousarray(array)
    if array.dtype != DTYPES[header.dtype] or tuple(array.shape) != header.shape or header.encoding != "raw":
        raise FrameError("array does not match its header")
    return [header.to_bytes(), memoryview(array.reshape(-1).view(np.uint8)), *_audio_parts(header, sound)]


def frame(job: str, collector: str, first: int, count: int, token: str, images, transport: str,
          sound=None) -> list:
    """Encode float images in [0, 1] (a torch tensor or an array) the way ``transport`` says, and
    the audio that goes with them, ``sound`` = (waveform [batch, channels, samples], sample rate),
    as float32 whatever the transport."""
    if transport not in TRANSPORTS:
        raise FrameError(f"unknown transport {transport!r}")
    if sound is not None:
        waveform, rate = sound
        waveform = (waveform.detach().float().cpu().contiguous().numpy() if hasattr(waveform, "detach")
                    else np.ascontiguousarray(waveform, dtype=np.float32))
        sound = (waveform, int(rate))
    audio = _audio_header(sound)
    if transport == "float32":
        images = (images.detach().float().cpu().contiguous().numpy() if hasattr(images, "detach")
                  else np.asarray(images, dtype=np.float32))
        return encode(Header(job, collector, first, token, "float32", tuple(images.shape), count, audio=audio),
                      images, sound)
    if transport == "uint8":
        header = Header(job, collector, first, token, "uint8", tuple(images.shape), count, audio=audio)
        on_cpu = not hasattr(images, "detach") or images.device.type == "cpu"
        return [header.to_bytes(), LazyPixels(images) if on_cpu else to_pixels(images).reshape(-1),
                *_audio_parts(header, sound)]
    pixels = to_pixels(images)
    payload = pack_png(pixels)
    header = Header(job, collector, first, token, "uint8", tuple(pixels.shape), count, "png", len(payload), audio)
    return [header.to_bytes(), payload, *_audio_parts(header, sound)]


_PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def pack_png(pixels: np.ndarray) -> bytes:
    from PIL import Image
    import io

    if pixels.shape[-1] not in _PNG_MODES:
        raise FrameError("png frames take 1, 3 or 4 channels")
    parts = []
    for image in pixels:
        out = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(out, "PNG", compress_level=1)
        data = out.getvalue()
        parts += [len(data).to_bytes(4, "big"), data]
    return b"".join(parts)


def unpack_png(header: Header, payload: bytes, out: np.ndarray) -> None:
    """Decode a png frame into ``out`` (float32, the header's shape), refusing any image whose
    size or channels differ from the header before decoding its pixels."""
    from PIL import Image
    import io

    batch, height, width, channels = header.shape
    position = 0
    for i in range(batch):
        if position + 4 > len(payload):
            raise FrameError(f"png frame ends before image {i}")
        size = int.from_bytes(payload[position:position + 4], "big")
        data = payload[position + 4:position + 4 + size]
        position += 4 + size
        if len(data) != size:
            raise FrameError(f"png frame ends inside image {i}")
        try:
            image = Image.open(io.BytesIO(data))
            if image.format != "PNG" or image.size != (width, height) or image.mode != _PNG_MODES.get(channels):
                raise FrameError(f"image {i} is {image.format} {image.size} {image.mode}, "
                                 f"not the {width}x{height} {_PNG_MODES.get(channels)} PNG the header promises")
            pixels = np.asarray(image)
        except FrameError:
            raise
        except Exception as exc:  # PIL raises many kinds for broken data
            raise FrameError(f"image {i} is not a readable PNG: {exc}") from None
        out[i] = pixels.reshape(height, width, channels) / np.float32(255.0)
    if position != len(payload):
        raise FrameError("png frame has bytes after its last image")


def decode(frame: bytes, with_audio: bool = False):
    """Decode a whole raw frame held in memory (the server streams instead; this is for tests and
    tools): (header, images), or (header, images, waveform or None) with ``with_audio``. A frame
    that carries audio is refused without ``with_audio``, so that its audio is not dropped unseen."""
    size = header_length(frame[:PREFIX_SIZE])
    header = parse_header(frame[PREFIX_SIZE:PREFIX_SIZE + size])
    payload = frame[PREFIX_SIZE + size:]
    if len(payload) != header.payload_size:
        raise FrameError(f"payload has {len(payload)} bytes, the header promises {header.payload_size}")
    if header.encoding != "raw":
        raise FrameError("decode reads raw frames; png frames are read with unpack_png")
    array = np.frombuffer(payload[:header.image_size], dtype=DTYPES[header.dtype]).reshape(header.shape)
    if not with_audio:
        if header.audio is not None:
            raise FrameError("this frame carries audio; decode it with with_audio=True")
        return header, array
    waveform = (None if header.audio is None
                else np.frombuffer(payload[header.image_size:], dtype=np.float32).reshape(header.audio[1]))
    return header, array, waveform


def quantize(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to 8 bits, rounding to nearest: at least the fidelity a PNG keeps."""
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


class LazyPixels:
    """A uint8 payload made a slice at a time while it is sent, so that quantizing on the CPU
    overlaps the transfer instead of preceding it."""

    SLICE = 1 << 20

    def __init__(self, images):
        self.flat = images.reshape(-1)

    def __len__(self) -> int:
        return int(self.flat.shape[0])

    def chunks(self):
        for start in range(0, len(self), self.SLICE):
            yield memoryview(to_pixels(self.flat[start:start + self.SLICE]))

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks())


def to_pixels(images) -> np.ndarray:
    """quantize() for a torch tensor too, done where the tensor lives: on a GPU worker that is the
    GPU, so a quarter of the bytes cross to the CPU, and torch uses every core either way."""
    if hasattr(images, "detach"):
        return images.detach().clamp(0, 1).mul(255).round_().byte().cpu().contiguous().numpy()
    return quantize(images)


# --- reading a frame from a request body ----------------------------------------------------------
#
# Every frame a worker posts (results, tiles, spread values) is read the same way: the prefix and
# the header, checked against the body's length and a payload limit before anything else is read,
# then the payload a megabyte at a time straight into its buffers, then nothing more.

MAX_PAYLOAD = 4 << 30


class Rejected(Exception):
    """A frame (or what it carries) refused, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_header(reader, content_length: int | None, what: str, length_of=None, parse=None):
    """The header of a frame arriving on ``reader`` (an asyncio stream): result frames by default,
    or another kind by its ``length_of(prefix)`` and ``parse(raw)``. Raises Rejected."""
    import asyncio

    length_of, parse = length_of or header_length, parse or parse_header
    try:
        size = length_of(await reader.readexactly(PREFIX_SIZE))
        header = parse(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise Rejected(400, f"truncated {what}: the body ended inside the header") from None
    except FrameError as exc:
        raise Rejected(400, f"bad {what}: {exc}") from None
    if header.payload_size > MAX_PAYLOAD:
        raise Rejected(413, f"a {what} may hold at most {MAX_PAYLOAD >> 30} GiB; "
                            f"this one declares {header.payload_size} bytes")
    expected = PREFIX_SIZE + size + header.payload_size
    if content_length is not None and content_length != expected:
        raise Rejected(400, f"body is {content_length} bytes but the header promises {expected}")
    return header


async def read_into(reader, target: memoryview, what: str) -> None:
    """Fill ``target`` from the body, a megabyte at a time, straight into place."""
    filled = 0
    while filled < len(target):
        chunk = await reader.read(min(len(target) - filled, 1 << 20))
        if not chunk:
            raise Rejected(400, f"truncated {what}: fewer payload bytes than the header promises")
        target[filled:filled + len(chunk)] = chunk
        filled += len(chunk)


async def read_exactly(reader, size: int, what: str) -> bytes:
    import asyncio

    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise Rejected(400, f"truncated {what}: fewer payload bytes than the header promises") from None


def all_finite(array: np.ndarray) -> bool:
    """Whether every value is a finite number, looked at a million values at a time (a whole
    frame's worth of booleans at once would be a large allocation)."""
    flat = array.reshape(-1)
    step = 1 << 20
    return all(bool(np.isfinite(flat[start:start + step]).all()) for start in range(0, flat.size, step))


async def read_end(reader) -> None:
    """The body must end where the header said."""
    if await reader.read(1):
        raise Rejected(400, "the body is longer than its header promises")


# --- value frames: what a worker sends back for a spread prompt ------------------------------------
#
#     VALUE_MAGIC (4 bytes) | header length (4 bytes, big-endian) | header (UTF-8 JSON) | payload
#
# The header names the spread prompt and its token, holds the values as a JSON tree whose tensors
# are references {"a": i} into ``arrays`` ([dtype, shape] each), and the payload is those arrays'
# raw bytes, one after another in C order. IMAGE and MASK are one tensor, LATENT a dict of tensors
# and lists, AUDIO a dict of a waveform tensor and its sample rate; each value of an output slot
# travels exactly, whatever its dtype (bfloat16 as its 16 raw bits).

VALUE_MAGIC = b"CDV1"
MAX_VALUE_HEADER = 1 << 20
MAX_RANK = 8
VALUE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64,
                "uint8": np.uint8, "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
                "bool": np.bool_}


@dataclass(frozen=True)
class ValueHeader:
    prompt: str
    token: str
    tree: object
    arrays: tuple  # ((dtype, shape), ...)

    @property
    def payload_size(self) -> int:
        return sum(math.prod(shape) * np.dtype(VALUE_DTYPES[dtype]).itemsize for dtype, shape in self.arrays)

    def to_bytes(self) -> bytes:
        body = json.dumps({"prompt": self.prompt, "token": self.token, "tree": self.tree,
                           "arrays": [[d, list(s)] for d, s in self.arrays]}, separators=(",", ":")).encode()
        if len(body) > MAX_VALUE_HEADER:
            raise FrameError(f"the values' description takes {len(body)} bytes; at most {MAX_VALUE_HEADER}")
        return VALUE_MAGIC + len(body).to_bytes(4, "big") + body


def value_header_length(prefix: bytes) -> int:
    if len(prefix) != PREFIX_SIZE or prefix[:4] != VALUE_MAGIC:
        raise FrameError("not a value frame (bad magic); is the worker running the same extension version?")
    size = int.from_bytes(prefix[4:], "big")
    if not 2 <= size <= MAX_VALUE_HEADER:
        raise FrameError(f"header length {size} is outside 2..{MAX_VALUE_HEADER}")
    return size


def parse_value_header(raw: bytes) -> ValueHeader:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FrameError("header must be a JSON object")
    for key in ("prompt", "token"):
        _check_name(data, key)
    arrays = data.get("arrays")
    if not isinstance(arrays, list):
        raise FrameError("header.arrays must be a list of [dtype, shape]")
    checked = []
    for i, entry in enumerate(arrays):
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in VALUE_DTYPES
                and isinstance(entry[1], list) and len(entry[1]) <= MAX_RANK
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in entry[1])):
            raise FrameError(f"header.arrays[{i}] must be [dtype, shape] with a dtype of "
                             f"{', '.join(VALUE_DTYPES)} and at most {MAX_RANK} sides")
        checked.append((entry[0], tuple(entry[1])))
    if "tree" not in data:
        raise FrameError("header.tree is missing")
    return ValueHeader(data["prompt"], data["token"], data["tree"], tuple(checked))


def value_frame(prompt: str, token: str, tree, arrays: list) -> list:
    """The frame as a list of buffers: the header, then each array's memory, uncopied.
    ``arrays`` holds (numpy array, dtype name) pairs."""
    contiguous = [(np.ascontiguousarray(a), dtype) for a, dtype in arrays]
    for a, dtype in contiguous:
        if dtype not in VALUE_DTYPES or a.dtype != np.dtype(VALUE_DTYPES[dtype]):
            raise FrameError(f"array of {a.dtype} does not match its dtype name {dtype!r}")
    header = ValueHeader(prompt, token, tree, tuple((dtype, tuple(a.shape)) for a, dtype in contiguous))
    return [header.to_bytes(), *(memoryview(a.reshape(-1).view(np.uint8)) for a, _dtype in contiguous if a.size)]


def decode_values(frame: bytes) -> tuple[ValueHeader, list]:
    """Decode a whole value frame held in memory (the server streams instead; for tests and tools)."""
    size = value_header_length(frame[:PREFIX_SIZE])
    header = parse_value_header(frame[PREFIX_SIZE:PREFIX_SIZE + size])
    payload = memoryview(frame)[PREFIX_SIZE + size:]
    if len(payload) != header.payload_size:
        raise FrameError(f"payload has {len(payload)} bytes, the header promises {header.payload_size}")
    arrays, position = [], 0
    for dtype, shape in header.arrays:
        kind = np.dtype(VALUE_DTYPES[dtype])
        count = math.prod(shape)
        arrays.append((np.frombuffer(payload[position:position + count * kind.itemsize], dtype=kind)
                       .reshape(shape).copy(), dtype))
        position += count * kind.itemsize
    return header, arrays
