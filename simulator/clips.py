"""Encode once, serve many: short looping clips of a camera's picture, cached on disk.

Live x264 costs ≈ 12.5 % of a core per 720p25 stream here (FIELD-NOTES), so sixteen live
encoders would starve whatever is under test. Instead each (camera, profile, picture, bitrate)
is encoded once into a loop a whole number of GOPs long, which the RTSP child replays for ever:
it starts with an IDR, so the loop restarts cleanly at a keyframe.

The clip file is deliberately trivial so the RTSP child (system Python + GStreamer, no PyAV)
reads it with the standard library::

    b"ISOCLIP1"  u32 header length  header (JSON, UTF-8)
    then per access unit: u32 length  u8 flags (bit 0: keyframe)  Annex-B bytes

All integers are big-endian. Every IDR carries SPS/PPS (and VPS for H.265) in-band. There are
no B-frames (DTS == PTS), 25 fps by default. The stream is made constant-bitrate by appending a
filler-data NAL unit (H.264 type 12, H.265 type 38) to access units whenever the running byte
count falls below the target line: the wire carries the configured bit rate even though the
synthetic scene would compress far below it (benchmarks need the real load; decoders ignore
filler).

Files live in ``$ISOCAM_SIM_CACHE/clips`` (or ``~/.cache/isocam-sim/clips``), named by a hash of
every parameter and of this module's and ``scene.py``'s source, and are written atomically
(temporary file + rename) so simulators running side by side never see half a file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np

from simulator import scene
from simulator.camera import PICTURES, Codec, Picture

log = logging.getLogger(__name__)

MAGIC = b"ISOCLIP1"
FORMAT_VERSION = 1
FLAG_KEYFRAME = 0x01
#: Loop length: two 2 s GOPs (so consecutive keyframes differ). Encoding is the cost, paid
#: once per clip: 16 cameras x (720p 2 Mbit/s + 360p 512 kbit/s) took 11-16 s on this 2-core
#: machine (quiet / shared) at 4 s; 10 s loops would take 2.5x as long.
DEFAULT_SECONDS = scene.DEFAULT_PERIOD_S
#: x264 "superfast" gives High profile with CABAC and deblocking like a real camera's main
#: stream, for ≈ 1.3x the cost of "ultrafast" (Constrained Baseline); x265 is slow, so fastest.
X264_PRESET = "superfast"
X265_PRESET = "ultrafast"
#: Pictures that do not show the camera's name (nothing to read on them): one clip serves all
#: cameras, so their `ClipSpec` drops the name.
NAMELESS_PICTURES: frozenset[Picture] = frozenset({"black", "covered"})
#: Pictures that do not change over time: drawn once, encoded as one GOP that repeats.
STATIC_PICTURES: frozenset[Picture] = frozenset({"black", "frozen"})

_HEADER = struct.Struct(">I")
_RECORD = struct.Struct(">IB")
_SOURCES = (Path(__file__), Path(scene.__file__))
#: VUI colour description matching `_i420` (else HD decoders may assume BT.709)
_BT601 = "colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m"


class ClipError(RuntimeError):
    """A clip could not be encoded or read back."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip's bytes (and so its cache file)."""

    name: str  # the camera's name, burned into the picture
    width: int
    height: int
    picture: Picture = "normal"
    bitrate_kbps: int = 2000
    codec: Codec = "H264"
    fps: int = 25
    gop: int = 50
    seconds: float = DEFAULT_SECONDS

    def __post_init__(self) -> None:
        if self.picture not in PICTURES:
            raise ValueError(f"unknown picture {self.picture!r}; known: {', '.join(PICTURES)}")
        if self.codec not in ("H264", "H265"):
            raise ValueError(f"unknown codec {self.codec!r}; known: H264, H265")
        if not 16 <= self.bitrate_kbps <= 100_000:
            raise ValueError(f"bitrate {self.bitrate_kbps} kbit/s out of range 16..100000")
        if self.width % 2 or self.height % 2 or self.width < 64 or self.height < 64:
            raise ValueError(f"frame size {self.width}x{self.height}: need even sizes >= 64x64")
        if not 1 <= self.fps <= 60 or self.gop < 1:
            raise ValueError(f"fps {self.fps} / gop {self.gop} out of range")
        frames = self.seconds * self.fps
        if frames != int(frames) or int(frames) % self.gop or frames <= 0:
            raise ValueError(
                f"clip of {self.seconds} s at {self.fps} fps is not a whole number of "
                f"{self.gop}-frame GOPs, so it would not loop at a keyframe"
            )
        if self.picture in NAMELESS_PICTURES and self.name:
            object.__setattr__(self, "name", "")

    @property
    def frames(self) -> int:
        return int(self.seconds * self.fps)

    def key(self) -> str:
        """Hash of every parameter plus the code that draws and encodes (a change re-encodes)."""
        h = hashlib.sha256()
        h.update(json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True).encode())
        h.update(_code_fingerprint())
        return h.hexdigest()[:32]

    def filename(self) -> str:
        """``<picture>-<size>-<kbps>-<codec>-<code version>-<key>.clip``."""
        w, h, kbps, codec = self.width, self.height, self.bitrate_kbps, self.codec.lower()
        return f"{self.picture}-{w}x{h}-{kbps}k-{codec}-{_code_tag()}-{self.key()}.clip"


@functools.cache
def _code_fingerprint() -> bytes:
    return hashlib.sha256(b"".join(src.read_bytes() for src in _SOURCES)).digest()


def _code_tag() -> str:
    """Short version of the drawing/encoding code, so `prune_cache` can tell stale clips."""
    return "c" + _code_fingerprint().hex()[:7]


@dataclass
class Clip:
    """A clip read back into memory (tests and tools; the RTSP child has its own reader)."""

    header: dict[str, object]
    units: list[tuple[bool, bytes]] = field(default_factory=list)  # (keyframe, Annex-B)

    @property
    def byte_count(self) -> int:
        return sum(len(b) for _, b in self.units)


def cache_dir() -> Path:
    """Where clips are cached: ``$ISOCAM_SIM_CACHE/clips`` or ``~/.cache/isocam-sim/clips``."""
    root = os.environ.get("ISOCAM_SIM_CACHE")
    if root:
        return Path(root).expanduser() / "clips"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "isocam-sim" / "clips"


def clip_path(spec: ClipSpec, directory: Path | None = None) -> Path:
    """The cache file `ensure_clip` would produce for `spec` (it may not exist yet)."""
    return (directory or cache_dir()) / spec.filename()


def prune_cache(directory: Path | None = None, now: float | None = None) -> int:
    """Delete what the cache no longer needs; returns how many files went.

    Clips made by other versions of the drawing/encoding code once a day old (a day's grace
    lets two checkouts share a cache), any clip untouched for 30 days, and temporary files an
    hour old (left by a killed encoder). A clip deleted while a simulator plays it is harmless:
    the RTSP child holds it in memory."""
    directory = directory or cache_dir()
    now = time.time() if now is None else now
    tag = f"-{_code_tag()}-"
    removed = 0
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            age = now - entry.stat().st_mtime
            if entry.suffix == ".tmp":
                stale = age > 3600
            elif entry.suffix == ".clip":
                stale = age > 30 * 86400 or (tag not in entry.name and age > 86400)
            else:
                stale = False
            if stale:
                entry.unlink()
                removed += 1
        except FileNotFoundError:  # another simulator pruned it first
            continue
    if removed:
        log.info("pruned %d stale files from %s", removed, directory)
    return removed


def clip_is_cached(spec: ClipSpec, directory: Path | None = None) -> bool:
    """True when `spec`'s clip is in the cache and whole (no encoding needed)."""
    return _looks_complete(clip_path(spec, directory))


def ensure_clip(spec: ClipSpec, directory: Path | None = None, threads: int = 1) -> Path:
    """Return the path of `spec`'s clip, encoding it first unless it is already cached.

    `threads` is the encoder's thread count: 1 inside a process pool (one encoder per core),
    0 lets the encoder use every core for a single clip.
    """
    path = clip_path(spec, directory)
    if _looks_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            _encode(spec, out, threads)
        os.replace(tmp_name, path)  # atomic: readers see the old state or the whole file
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    log.info("encoded %s in %.2f s", path.name, time.perf_counter() - started)
    return path


def ensure_clips(
    specs: Iterable[ClipSpec], directory: Path | None = None, workers: int | None = None
) -> list[Path]:
    """Ensure many clips at once, one encoder process per core; paths in input order."""
    specs = list(specs)
    prune_cache(directory)
    with ClipEncoder(workers, directory) as encoder:
        return encoder.ensure_many(specs)


class ClipEncoder:
    """A pool of encoder processes (``python -m simulator.clips --worker``), one per core.

    Why not `ProcessPoolExecutor`: its "spawn" workers re-import the caller's ``__main__``
    (breaks scripts without a main guard and ``python -`` snippets), and forking a process that
    runs an event loop and threads is unsafe. These workers are plain subprocesses that read
    one spec per line, so any caller can use them. `ensure` is blocking and thread-safe; call it
    from threads (``asyncio.to_thread``) to encode in parallel. Identical concurrent requests
    are encoded once.
    """

    def __init__(self, workers: int | None = None, directory: Path | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.directory = directory
        self._idle: queue.LifoQueue[subprocess.Popen[bytes] | None] = queue.LifoQueue()
        for _ in range(self.workers):
            self._idle.put(None)  # a slot; the process starts on first use
        self._lock = threading.Lock()
        self._inflight: dict[ClipSpec, Future[Path]] = {}
        self._closed = False

    def __enter__(self) -> ClipEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure(self, spec: ClipSpec) -> Path:
        """Path of `spec`'s clip, encoded in a worker process unless already cached."""
        path = clip_path(spec, self.directory)
        if _looks_complete(path):
            return path
        with self._lock:
            if self._closed:
                raise ClipError("clip encoder is closed")
            fut = self._inflight.get(spec)
            owner = fut is None
            if fut is None:
                fut = self._inflight[spec] = Future()
        if not owner:
            return fut.result()
        try:
            fut.set_result(self._encode_in_worker(spec))
        except BaseException as exc:
            fut.set_exception(exc)
        finally:
            with self._lock:
                self._inflight.pop(spec, None)
        return fut.result()

    def ensure_many(self, specs: Iterable[ClipSpec]) -> list[Path]:
        """Ensure all `specs` in parallel (one thread per worker); paths in input order."""
        specs = list(specs)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="clip-encoder") as pool:
            return list(pool.map(self.ensure, specs))

    def release_idle(self) -> None:
        """Stop worker processes that are not encoding (each holds ~70 MB of av/cv2/numpy);
        they start again on the next request."""
        held = []
        while True:
            try:
                held.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for proc in held:
            _stop_worker(proc)
            self._idle.put(None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.release_idle()

    def _encode_in_worker(self, spec: ClipSpec) -> Path:
        proc = self._idle.get()
        try:
            if proc is None or proc.poll() is not None:
                proc = _start_worker()
            assert proc.stdin is not None and proc.stdout is not None
            request = {"spec": asdict(spec), "directory": str(self.directory or "")}
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                code = proc.wait()
                proc = None
                raise ClipError(f"clip encoder process exited with status {code}")
            answer = json.loads(line)
            if "error" in answer:
                raise ClipError(f"encoding {spec.filename()} failed: {answer['error']}")
            return Path(answer["path"])
        except (BrokenPipeError, OSError) as exc:
            _stop_worker(proc)
            proc = None
            raise ClipError(f"clip encoder process failed: {exc}") from exc
        finally:
            self._idle.put(proc)


def _start_worker() -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # so `-m simulator.clips` resolves
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "simulator.clips", "--worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )


def _stop_worker(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the worker exits at end of input
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _worker_main() -> int:
    """Encoder process: one JSON request per stdin line, one JSON answer per stdout line."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            spec = ClipSpec(**req["spec"])
            path = ensure_clip(spec, Path(req["directory"]) if req["directory"] else None)
            answer: dict[str, str] = {"path": str(path)}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


def read_clip(path: Path) -> Clip:
    """Parse a clip file (raises `ClipError` when it is not one or is truncated)."""
    data = path.read_bytes()
    return _parse(data, path)


def iter_nal_types(annexb: bytes, codec: Codec) -> Iterator[int]:
    """NAL unit types in an Annex-B access unit, in order (for tests and diagnostics)."""
    i = annexb.find(b"\x00\x00\x01")
    while i >= 0:
        start = i + 3
        if start >= len(annexb):
            return
        b = annexb[start]
        yield (b >> 1) & 0x3F if codec == "H265" else b & 0x1F
        i = annexb.find(b"\x00\x00\x01", start)


# --- encoding --------------------------------------------------------------------------------


def _encoder(spec: ClipSpec, threads: int) -> av.VideoCodecContext:
    kbps = spec.bitrate_kbps
    common = f"keyint={spec.gop}:min-keyint={spec.gop}:scenecut=0:bframes=0"
    if spec.codec == "H264":
        ctx = av.CodecContext.create("libx264", "w")
        ctx.options = {
            "preset": X264_PRESET,
            "maxrate": f"{kbps}k",
            "bufsize": f"{kbps}k",
            # SPS/PPS are repeated before every IDR by default (no global header)
            "x264-params": f"{common}:open-gop=0:{_BT601}",
        }
    else:
        ctx = av.CodecContext.create("libx265", "w")
        ctx.options = {
            "preset": X265_PRESET,
            "x265-params": (
                f"{common}:open-gop=0:{_BT601}:repeat-headers=1:vbv-maxrate={kbps}:vbv-bufsize={kbps}"
                ":log-level=error:info=0" + (":pools=1:frame-threads=1" if threads == 1 else "")
            ),
        }
    assert isinstance(ctx, av.VideoCodecContext)
    ctx.width, ctx.height, ctx.pix_fmt = spec.width, spec.height, "yuv420p"
    ctx.time_base = Fraction(1, spec.fps)
    ctx.framerate = Fraction(spec.fps, 1)
    ctx.bit_rate = kbps * 1000
    ctx.gop_size = spec.gop
    ctx.max_b_frames = 0
    ctx.thread_count = threads
    return ctx


def _i420(bgr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """BGR → planar YUV 4:2:0, BT.601 limited ("TV") range as decoders assume for yuv420p
    (OpenCV's I420 conversion is exactly that, and 10x faster than swscale here)."""
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420, dst=out)


def _frames(spec: ClipSpec, count: int) -> Iterator[np.ndarray]:
    """The clip's first `count` pictures as I420 arrays, drawn into reused buffers (the encoder
    copies each frame before the next is drawn); static pictures are drawn once."""
    static = spec.picture in STATIC_PICTURES
    bgr = np.empty((spec.height, spec.width, 3), np.uint8)
    yuv = np.empty((spec.height * 3 // 2, spec.width), np.uint8)
    for i in range(count):
        if i == 0 or not static:
            t = i / spec.fps
            pic = scene.render_frame(
                spec.name, spec.width, spec.height, spec.picture, t, period=spec.seconds, out=bgr
            )
            _i420(pic, out=yuv)
        yield yuv


def _encode(spec: ClipSpec, out: BinaryIO, threads: int) -> None:
    ctx = _encoder(spec, threads)
    # a static picture is one GOP repeated: every keyframe is then bit-identical, as a frozen
    # camera's are to a frame-difference check (re-encoding would add rate-control noise)
    count = spec.gop if spec.picture in STATIC_PICTURES else spec.frames
    units: list[tuple[bool, bytes]] = []
    for i, yuv in enumerate(_frames(spec, count)):
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = i
        units.extend((p.is_keyframe, bytes(p)) for p in ctx.encode(frame))
    units.extend((p.is_keyframe, bytes(p)) for p in ctx.encode(None))
    if len(units) != count:
        raise ClipError(f"encoder returned {len(units)} access units for {count} frames")
    if not units[0][0]:
        raise ClipError("encoder did not start the clip with a keyframe")
    units = _pad_to_bitrate(units * (spec.frames // count), spec)
    header = {
        "version": FORMAT_VERSION,
        **asdict(spec),
        "frames": len(units),
        "bytes": sum(len(b) for _, b in units),
    }
    blob = json.dumps(header, sort_keys=True).encode()
    write = out.write
    write(MAGIC + _HEADER.pack(len(blob)) + blob)
    for key, data in units:
        write(_RECORD.pack(len(data), FLAG_KEYFRAME if key else 0) + data)


def _filler_nal(codec: Codec, size: int) -> bytes:
    """A filler-data NAL unit of exactly `size` bytes (start code included; `size` >= 8)."""
    # H.264: nal_unit_type 12, filler data (7.3.2.7); H.265: type 38 FD_NUT, layer 0, tid 1
    head = b"\x00\x00\x00\x01\x0c" if codec == "H264" else b"\x00\x00\x00\x01\x4c\x01"
    return head + b"\xff" * (size - len(head) - 1) + b"\x80"  # ff_bytes, rbsp_trailing_bits


def _pad_to_bitrate(units: list[tuple[bool, bytes]], spec: ClipSpec) -> list[tuple[bool, bytes]]:
    """Append filler so the running byte count never falls below the CBR line (bytes per frame
    times frames so far); a big IDR runs ahead of the line and the next P-frames are left
    alone until it catches up, like a CBR encoder's buffer."""
    per_frame = spec.bitrate_kbps * 1000 / 8 / spec.fps
    total = 0
    out: list[tuple[bool, bytes]] = []
    for i, (key, data) in enumerate(units):
        total += len(data)
        deficit = int(per_frame * (i + 1)) - total
        if deficit >= 16:
            data += _filler_nal(spec.codec, deficit)
            total += deficit
        out.append((key, data))
    return out


# --- reading ---------------------------------------------------------------------------------


def _looks_complete(path: Path) -> bool:
    """Cheap check that a cached clip is whole (files are renamed into place only when
    complete, so the size recorded in the header is enough)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(MAGIC) + _HEADER.size)
            if len(head) < len(MAGIC) + _HEADER.size or not head.startswith(MAGIC):
                return False
            (n,) = _HEADER.unpack_from(head, len(MAGIC))
            header = json.loads(f.read(n))
            expected = len(head) + n + header["frames"] * _RECORD.size + header["bytes"]
        return path.stat().st_size == expected
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _parse(data: bytes, path: Path) -> Clip:
    if not data.startswith(MAGIC):
        raise ClipError(f"{path} is not a clip file")
    try:
        (n,) = _HEADER.unpack_from(data, len(MAGIC))
        pos = len(MAGIC) + _HEADER.size
        clip = Clip(json.loads(data[pos : pos + n]))
        pos += n
        while pos < len(data):
            size, flags = _RECORD.unpack_from(data, pos)
            pos += _RECORD.size
            if pos + size > len(data):
                raise ClipError(f"{path} is truncated")
            clip.units.append((bool(flags & FLAG_KEYFRAME), data[pos : pos + size]))
            pos += size
    except (struct.error, ValueError) as exc:
        raise ClipError(f"{path} is damaged: {exc}") from exc
    if len(clip.units) != clip.header.get("frames"):
        raise ClipError(f"{path} is truncated")
    return clip


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        logging.basicConfig(level=logging.WARNING)
        sys.exit(_worker_main())
    sys.exit("usage: python -m simulator.clips --worker  (an encoder process of ClipEncoder)")
