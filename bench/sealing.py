"""Sealing cost: chunk throughput per core, and the fixed cost of each wrapped key per segment.

Run: .venv/bin/python bench/sealing.py [--seconds 1.0]

Single-threaded on purpose: MB/s of CPU time = MB/s per core. Output is a sink that discards
bytes, so the figures are the cost of sealing (AES-256-GCM, framing, optional SHA-256 of the
file for the index's hash chain), not of the disk.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from collections.abc import Callable
from functools import partial

from cryptography import __version__ as cryptography_version

from sitelink.sealed_segment import (
    RecipientPrivateKey,
    RecipientPublicKey,
    SealSuite,
    SegmentHeader,
    SegmentSealer,
    generate_private_key,
    open_segment,
    scan_segment,
)

MiB = 1024 * 1024


class _Sink(io.RawIOBase):
    """Accepts and forgets bytes, like /dev/null without the syscall."""

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        return len(b)


def _cpu_rate(work: Callable[[], int], seconds: float) -> float:
    """Units of work per CPU second, repeating `work` (returns units done) for ~`seconds`."""
    done, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        done += work()
    return done / elapsed


def bench_chunks(seconds: float) -> None:
    key = generate_private_key(SealSuite.X25519)
    recipients = [key.public_key()]
    header = SegmentHeader("bench-site", "cam-01", 0, time.time())
    print("| chunk | seal MB/s per core | seal + SHA-256 MB/s | open MB/s | bytes added / chunk |")
    print("|---|---|---|---|---|")
    for size in (64 * 1024, 256 * 1024, 1 * MiB):
        data = os.urandom(size)
        per_round = max(1, (32 * MiB) // size)

        def seal(track: bool, data: bytes = data, per_round: int = per_round) -> int:
            sealer = SegmentSealer(_Sink(), header, recipients, track_sha256=track)
            for _ in range(per_round):
                sealer.write_chunk(data)
            sealer.close()
            return per_round * len(data)

        buf = io.BytesIO()
        with SegmentSealer(buf, header, recipients) as sealer:
            for _ in range(per_round):
                sealer.write_chunk(data)
        sealed = buf.getvalue()
        scan = scan_segment(io.BytesIO(sealed))
        overhead = (scan.complete_size - scan.header_size - per_round * size) / per_round

        def unseal(sealed: bytes = sealed) -> int:
            with open_segment(io.BytesIO(sealed), key) as seg:
                return sum(len(c) for c in seg)

        seal_rate = _cpu_rate(partial(seal, False), seconds) / 1e6
        hashed_rate = _cpu_rate(partial(seal, True), seconds) / 1e6
        open_rate = _cpu_rate(unseal, seconds) / 1e6
        print(
            f"| {size // 1024} KiB | {seal_rate:,.0f} | {hashed_rate:,.0f} | {open_rate:,.0f} "
            f"| {overhead:.0f} B |"
        )


def bench_wrapping(seconds: float) -> None:
    header = SegmentHeader("bench-site", "cam-01", 0, time.time())
    print()
    print("| suite | wrapped key | ms per wrapped key (seal) | ms to open a header (unwrap) |")
    print("|---|---|---|---|")
    for suite in (SealSuite.MLKEM768_X25519, SealSuite.X25519):
        key = generate_private_key(suite)
        pubs = [key.public_key(), generate_private_key(suite).public_key()]
        # A header with 1 and with 2 recipients: the difference is the cost of one wrapped key.
        one = _cpu_rate(partial(_new_sealer, header, pubs[:1]), seconds)
        two = _cpu_rate(partial(_new_sealer, header, pubs), seconds)
        per_wrap_ms = (1 / two - 1 / one) * 1e3
        buf = io.BytesIO()
        SegmentSealer(buf, header, pubs[:1]).close()
        sealed = buf.getvalue()
        open_ms = 1e3 / _cpu_rate(partial(_open, sealed, key), seconds)
        print(f"| {suite.value} | {suite.wrapped_size} B | {per_wrap_ms:.3f} | {open_ms:.3f} |")


def _new_sealer(header: SegmentHeader, recipients: list[RecipientPublicKey]) -> int:
    SegmentSealer(_Sink(), header, recipients).close()
    return 1


def _open(sealed: bytes, key: RecipientPrivateKey) -> int:
    with open_segment(io.BytesIO(sealed), key) as seg:
        for _ in seg:
            pass
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per figure")
    args = parser.parse_args()
    print(
        f"# sealing benchmark: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"cryptography {cryptography_version}"
    )
    print()
    bench_chunks(args.seconds)
    bench_wrapping(args.seconds)


if __name__ == "__main__":
    main()
