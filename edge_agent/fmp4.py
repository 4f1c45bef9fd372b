"""Split the byte stream of FFmpeg's fragmented-MP4 muxer into init and media fragments.

The recorder seals every fragment as one chunk the moment the muxer finishes it, so a crash
loses at most the fragment in flight and plaintext never reaches the disk. `FragmentSplitter`
is the file object handed to ``av.open(..., "w", format="mp4")``: it has ``write`` but no
``seek``/``tell``, so PyAV tells FFmpeg the output is not seekable and the muxer streams boxes
strictly forward (ISO/IEC 14496-12 §4.2: size, type, payload). It reassembles top-level boxes
across FFmpeg's I/O-buffer-sized writes and hands out

- the init segment: everything up to and including ``moov`` (``ftyp`` + ``moov``), once;
- each media fragment: everything from the end of the previous one up to and including its
  ``mdat`` (``moof`` + ``mdat``, plus any ``styp``/``sidx``/``prft`` in between).

FFmpeg ends a fragmented file with ``mfra`` (a random-access index of absolute file offsets):
the offsets mean nothing once fragments are sealed as separate chunks, so it is dropped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

#: The movflags that make FFmpeg's mp4 muxer write CMAF-style fragments to a pipe: an empty
#: ``moov`` up front (no seeking back to patch it), a fragment at every keyframe (and every
#: `frag_duration`), and ``moof``-relative data offsets so each fragment stands on its own.
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"

_BOX = struct.Struct(">I4s")
_LARGE = struct.Struct(">Q")


class Fmp4Error(ValueError):
    """The muxer output is not a fragmented MP4 stream this splitter can cut."""


#: I/O buffer for ``av.open(splitter, "w", ..., buffer_size=MUXER_BUFFER_SIZE)``: larger than a
#: fragment (1 s at 4 Mbit/s ≈ 0.5 MB), so the muxer writes each one in a single call. With
#: FFmpeg's 32 KiB a fragment came in ~16 calls, each taking the GIL back from the muxer
#: and copying into the reassembly buffer. Only the part a fragment really uses is touched.
MUXER_BUFFER_SIZE = 4 * 1024 * 1024


def muxer_options(fragment_seconds: float) -> dict[str, str]:
    """Options for ``av.open(splitter, "w", format="mp4", options=...)``."""
    return {"movflags": MOVFLAGS, "frag_duration": str(round(fragment_seconds * 1_000_000))}


class FragmentSplitter:
    """Write-only, non-seekable sink for the mp4 muxer that calls back per complete piece.

    `on_init(data)` is called once with ``ftyp``+``moov``; `on_fragment(data)` once per
    ``moof``+``mdat``. Both run synchronously inside the muxer's ``write`` call, so when
    ``mux()`` returns, every fragment the muxer has finished has been handed on.

    Cost matters: this runs for every camera, every fragment. Opened with an I/O buffer larger
    than a fragment (`MUXER_BUFFER_SIZE`), the muxer hands over each ``moof``+``mdat`` in one
    ``write`` call, which is passed on as is, without a copy; only output that splits a box
    across calls is reassembled (one copy).
    """

    def __init__(
        self, on_init: Callable[[bytes], None], on_fragment: Callable[[bytes], None]
    ) -> None:
        self._on_init = on_init
        self._on_fragment = on_fragment
        self._buf = bytearray()
        self._pos = 0  # start of the next box header inside _buf
        self._box_end: int | None = None  # end of the box being received, once its header is in
        self._box_type = b""
        self.init_seen = False
        self.fragments = 0
        self.bytes_in = 0

    def write(self, data: bytes) -> int:
        """Take muxer output (any split); emit every init/fragment it completes."""
        n = len(data)
        self.bytes_in += n
        if self._buf:
            self._buf += data
            self._drain()
            return n
        # Nothing pending: cut the pieces straight out of `data`; keep only a remainder.
        rest = self._cut(data)
        if rest < n:
            self._buf += memoryview(data)[rest:]
            self._drain()
        return n

    def _cut(self, data: bytes) -> int:
        """Hand on every piece that `data` completes; return where the unfinished rest starts."""
        n = len(data)
        pos = piece = 0
        while n - pos >= _BOX.size:
            size, box = _BOX.unpack_from(data, pos)
            header = _BOX.size
            if size == 1:
                if n - pos < _BOX.size + _LARGE.size:
                    break
                (size,) = _LARGE.unpack_from(data, pos + _BOX.size)
                header += _LARGE.size
            _check_size(box, size, header)
            end = pos + size
            if end > n:
                break
            pos = end
            if box == b"moov" or box == b"mdat":
                chunk = data if piece == 0 and end == n else data[piece:end]
                self._emit_piece(bytes(chunk), is_init=box == b"moov")
                piece = end
            elif box == b"mfra":
                piece = end  # see module docstring: offsets are meaningless after sealing
        return piece

    def _drain(self) -> None:
        buf = self._buf
        while True:
            if self._box_end is None and not self._read_header():
                return
            assert self._box_end is not None
            if len(buf) < self._box_end:
                return  # the common case while a big mdat streams in: O(1) per write
            end, box = self._box_end, self._box_type
            self._box_end = None
            self._pos = end
            if box == b"moov" or box == b"mdat":
                with memoryview(buf) as view:
                    piece = bytes(view[:end])
                del buf[:end]
                self._pos = 0
                self._emit_piece(piece, is_init=box == b"moov")
            elif box == b"mfra":
                del buf[:end]  # see module docstring: offsets are meaningless after sealing
                self._pos = 0

    def _read_header(self) -> bool:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _BOX.size:
            return False
        size, box = _BOX.unpack_from(buf, pos)
        header = _BOX.size
        if size == 1:  # 64-bit largesize follows the type (§4.2)
            if len(buf) - pos < _BOX.size + _LARGE.size:
                return False
            (size,) = _LARGE.unpack_from(buf, pos + _BOX.size)
            header += _LARGE.size
        _check_size(box, size, header)
        self._box_end = pos + size
        self._box_type = bytes(box)
        return True

    def _emit_piece(self, piece: bytes, *, is_init: bool) -> None:
        if is_init == self.init_seen:
            what = "a second init segment" if is_init else "a fragment before the init segment"
            raise Fmp4Error(f"muxer wrote {what}")
        if is_init:
            self.init_seen = True
            self._on_init(piece)
        else:
            self.fragments += 1
            self._on_fragment(piece)

    @property
    def pending(self) -> int:
        """Bytes received but not yet handed on (a fragment still being written)."""
        return len(self._buf)

    def check_complete(self) -> None:
        """After the muxer is closed: raise if it left a partial box behind."""
        if self._buf:
            raise Fmp4Error(f"muxer stopped inside a box ({len(self._buf)} bytes left over)")


def _check_size(box: bytes, size: int, header: int) -> None:
    if size == 0:
        raise Fmp4Error(
            f"box {bytes(box)!r} runs to the end of the file: the muxer is not writing fragments"
        )
    if size < header:
        raise Fmp4Error(f"box {bytes(box)!r} claims {size} bytes, less than its own header")


def top_level_boxes(data: bytes) -> list[tuple[str, int]]:
    """(type, size) of each top-level box in `data`; for tests and diagnostics."""
    out: list[tuple[str, int]] = []
    pos = 0
    while pos + _BOX.size <= len(data):
        size, box = _BOX.unpack_from(data, pos)
        if size == 1:
            (size,) = _LARGE.unpack_from(data, pos + _BOX.size)
        elif size == 0:
            size = len(data) - pos
        if size < _BOX.size or pos + size > len(data):
            raise Fmp4Error(f"truncated box {box!r} at offset {pos}")
        out.append((box.decode("latin-1"), size))
        pos += size
    if pos != len(data):
        raise Fmp4Error(f"{len(data) - pos} trailing bytes after the last box")
    return out
