"""The one thing the recorder hands to image health: the latest keyframe, still compressed.

The recorder never decodes (it only remuxes). On every keyframe it keeps this small sample
(bytes of one packet plus the codec's extradata); the image-health checker decodes it at most
once every few seconds per camera, off the recorder's thread.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyframeSample:
    """One compressed keyframe as received from the camera.

    `codec` is FFmpeg's decoder name ("h264" or "hevc"); `extradata` the stream's parameter
    sets (avcC/hvcC or Annex B SPS/PPS) when the demuxer had them, else None (then `data`
    carries them in-band). `seq` increases by one per keyframe of the recorder's life, so a
    consumer can tell a new keyframe from the one it already checked; `wall` is the receipt
    time (epoch seconds) of the packet."""

    camera_id: str
    seq: int
    codec: str
    extradata: bytes | None
    data: bytes
    wall: float
    width: int
    height: int
