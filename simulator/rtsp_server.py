"""RTSP side of the simulator: one gst-rtsp-server per virtual camera, fed from looping clips.

Runs as a child process of `simulator.rtsp.RtspService` under the *system* interpreter
(``/usr/bin/python3``), the only one with GStreamer's introspection bindings (python3-gi). It
imports only the standard library and ``gi``: nothing from the venv, no other simulator module.

Each camera gets its own `GstRtspServer.RTSPServer` on its own port, so one camera can go
offline (port refuses) while the others keep serving. Each profile is a shared media
``appsrc ! h264parse ! rtph264pay`` (h265 alike): one feeder per mount however many clients
pull, and no encoder at all, because the access units come pre-encoded from a clip file (see
``simulator/clips.py`` for the format). A 50 Hz timer pushes every access unit that is due,
stamped with the pipeline's running time in 1/fps steps, so the stream is live and paced
like a camera's. A clip switch (picture fault, bit rate) happens at the next keyframe, so open
sessions keep decoding. Measured on 2 cores: ≈ 1 % of a core per mount being pulled (16 x
2 Mbit/s: 14 %; 32 x 4 Mbit/s: 34 %), ≈ 1 % idle, 43 MB RSS; exactly 25 fps over 4 minutes.

Control: JSON lines on stdin, one answer line per request on stdout, logs on stderr::

    {"id": 1, "cmd": "add", "camera": "cam-01", "host": "127.0.0.1", "port": 0,
     "user": "admin", "password": "pw", "mounts": {"main": {"clip": "/path.clip",
     "codec": "H264"}}, "stall": false, "offline": false}
    -> {"id": 1, "ok": true, "port": 40123}
    {"id": 2, "cmd": "set_clip", "camera": "cam-01", "mount": "main", "clip": "...",
     "codec": "H264"}
    {"id": 3, "cmd": "stall", "camera": "cam-01", "on": true}
    {"id": 4, "cmd": "offline", "camera": "cam-01", "on": true}
    {"id": 5, "cmd": "credentials", "camera": "cam-01", "user": "u", "password": "p"}
    {"id": 6, "cmd": "reboot", "camera": "cam-01"}
    {"id": 7, "cmd": "remove", "camera": "cam-01"}
    {"id": 8, "cmd": "status"}      -> {"id": 8, "ok": true, "cameras": {...}}
    {"id": 9, "cmd": "shutdown"}

Failures answer ``{"id": n, "ok": false, "error": "one line"}``. The first line the process
prints is ``{"event": "ready", ...}``, or ``{"event": "fatal", "error": ...}`` (exit status 3)
when GStreamer or one of its plugins is missing. End of stdin (the parent died) shuts down.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import sys
from typing import Any

log = logging.getLogger("rtsp-server")

DEBIAN_PACKAGES = (
    "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
)
_ELEMENTS = ("appsrc", "h264parse", "h265parse", "rtph264pay", "rtph265pay")

_MAGIC = b"ISOCLIP1"
_HEADER = struct.Struct(">I")
_RECORD = struct.Struct(">IB")
_TICK_MS = 20
#: After this long without being able to push (process starved or suspended), restart the
#: timeline at "now" instead of sending the backlog as one burst.
_MAX_LAG_NS = 1_000_000_000
_PAYLOADERS = {
    "H264": "h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1",
    "H265": "h265parse ! rtph265pay name=pay0 pt=96 config-interval=-1",
}
_CAPS = {
    "H264": "video/x-h264,stream-format=byte-stream,alignment=au",
    "H265": "video/x-h265,stream-format=byte-stream,alignment=au",
}

Gst: Any = None
GLib: Any = None
GstRtsp: Any = None
GstRtspServer: Any = None


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _load_gstreamer() -> str | None:
    """Import GStreamer through gi; return an error line naming what is missing, or None."""
    global Gst, GLib, GstRtsp, GstRtspServer
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtsp", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib as _GLib
        from gi.repository import Gst as _Gst
        from gi.repository import GstRtsp as _GstRtsp
        from gi.repository import GstRtspServer as _GstRtspServer
    except (ImportError, ValueError) as exc:
        return f"GStreamer RTSP server not usable from {sys.executable} ({exc}); install: " + (
            f"apt-get install {DEBIAN_PACKAGES}"
        )
    Gst, GLib, GstRtsp, GstRtspServer = _Gst, _GLib, _GstRtsp, _GstRtspServer
    Gst.init(None)
    missing = [e for e in _ELEMENTS if Gst.ElementFactory.find(e) is None]
    if missing:
        return f"GStreamer elements missing: {', '.join(missing)}; install: " + (
            f"apt-get install {DEBIAN_PACKAGES}"
        )
    return None


def _offer_digest_and_basic(auth: Any) -> None:
    """Make `auth` offer both Digest and Basic, as most cameras do.

    The binding declares GstRTSPAuthMethod an enum, not flags, so Python cannot pass
    DIGEST | BASIC; call the C function directly (stdlib ctypes). Without it: Digest only.
    """
    try:
        import ctypes

        lib = ctypes.CDLL("libgstrtspserver-1.0.so.0")
        capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        capsule_pointer.restype = ctypes.c_void_p
        capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        lib.gst_rtsp_auth_set_supported_methods.argtypes = [ctypes.c_void_p, ctypes.c_int]
        methods = int(GstRtsp.RTSPAuthMethod.DIGEST) | int(GstRtsp.RTSPAuthMethod.BASIC)
        lib.gst_rtsp_auth_set_supported_methods(capsule_pointer(auth.__gpointer__, None), methods)
    except (OSError, AttributeError, ValueError) as exc:
        log.warning("Basic auth not offered (%s); Digest only", exc)
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)


class CommandError(Exception):
    """A request that cannot be carried out; its message is the one-line answer."""


# --- clips -----------------------------------------------------------------------------------


class Clip:
    """A clip file in memory: one `Gst.Buffer` per access unit (pushed as cheap copies that
    share the memory) and which of them are keyframes."""

    def __init__(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CommandError(f"cannot read clip {path}: {exc.strerror}") from exc
        if not data.startswith(_MAGIC):
            raise CommandError(f"{path} is not a clip file")
        (n,) = _HEADER.unpack_from(data, len(_MAGIC))
        pos = len(_MAGIC) + _HEADER.size
        header = json.loads(data[pos : pos + n])
        pos += n
        self.path = path
        self.codec: str = header["codec"]
        self.fps: int = int(header["fps"])
        self.frame_ns = 1_000_000_000 // self.fps
        self.buffers: list[Any] = []
        first = b""
        self.sizes: list[int] = []
        self.keyframes: list[bool] = []
        while pos < len(data):
            size, flags = _RECORD.unpack_from(data, pos)
            pos += _RECORD.size
            if pos + size > len(data):
                raise CommandError(f"{path} is truncated")
            unit = data[pos : pos + size]
            if not self.buffers:
                first = unit
            buf = Gst.Buffer.new_wrapped(unit)
            key = bool(flags & 1)
            if not key:
                buf.set_flags(Gst.BufferFlags.DELTA_UNIT)
            self.buffers.append(buf)
            self.sizes.append(size)
            self.keyframes.append(key)
            pos += size
        if not self.buffers or not self.keyframes[0]:
            raise CommandError(f"{path} does not start with a keyframe")
        # SPS/PPS(/VPS) alone: lets a new media negotiate (answer DESCRIBE) during a stall
        # without sending a picture
        self.params_buffer = Gst.Buffer.new_wrapped(_parameter_sets(first, self.codec))

    def next_keyframe(self, index: int) -> int:
        """Index of the first keyframe at or after `index`, wrapping around the loop."""
        n = len(self.buffers)
        for k in range(n):
            i = (index + k) % n
            if self.keyframes[i]:
                return i
        return 0


def _parameter_sets(unit: bytes, codec: str) -> bytes:
    """The bytes of an Annex-B access unit before its first picture slice."""
    i = unit.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(unit):
        header = unit[i + 3]
        nal_type = (header >> 1) & 0x3F if codec == "H265" else header & 0x1F
        is_slice = nal_type <= 31 if codec == "H265" else 1 <= nal_type <= 5
        if is_slice:
            start = i - 1 if i > 0 and unit[i - 1] == 0 else i  # 4-byte start code
            return unit[:start]
        i = unit.find(b"\x00\x00\x01", i + 3)
    return unit


class ClipCache:
    """Clips by path, shared by every mount that plays them; dropped when none does."""

    def __init__(self) -> None:
        self._clips: dict[str, Clip] = {}

    def get(self, path: str) -> Clip:
        clip = self._clips.get(path)
        if clip is None:
            clip = self._clips[path] = Clip(path)
            log.info("loaded %s (%d access units)", os.path.basename(path), len(clip.buffers))
        return clip

    def collect(self, in_use: set[str]) -> None:
        for path in list(self._clips):
            if path not in in_use:
                del self._clips[path]


# --- serving ---------------------------------------------------------------------------------


class Feed:
    """One running shared media of a mount: its appsrc and where it is in which clip."""

    def __init__(self, mount: Mount, media: Any, appsrc: Any) -> None:
        self.mount = mount
        self.media = media
        self.appsrc = appsrc
        self.clip = mount.clip
        self.cursor = self.clip.next_keyframe(mount.resume_at)
        self.playing = False  # set by appsrc's first need-data (streaming thread)
        self.need_data_handler = 0
        self.next_rt: int | None = None  # running time of the next access unit
        self.resync = False
        self.primed = False  # has pushed anything (parameter sets or pictures)
        self.dead = False

    def pump(self, now: int, stalled: bool) -> None:
        """Push every access unit due by clock time `now` (only parameter sets if stalled)."""
        if not self.playing:
            return
        if self.need_data_handler:
            # one Python call per buffer from the streaming thread is not worth keeping
            self.appsrc.disconnect(self.need_data_handler)
            self.need_data_handler = 0
        base = self.appsrc.get_base_time()
        rt = now - base
        if stalled:
            if not self.primed:
                buf = self.clip.params_buffer.copy_region(
                    Gst.BufferCopyFlags.MEMORY, 0, self.clip.params_buffer.get_size()
                )
                buf.pts = buf.dts = rt
                self.appsrc.emit("push-buffer", buf)
                self.primed = True
                self.resync = True
            return
        self.primed = True
        if self.next_rt is None or self.resync or rt - self.next_rt > _MAX_LAG_NS:
            if self.next_rt is not None and not self.resync:
                log.warning(
                    "%s: fell %.1f s behind, resyncing", self.mount.label, (rt - self.next_rt) / 1e9
                )
            self.next_rt = rt
            self.resync = False
        while self.next_rt <= rt and not self.dead:
            self._push_one()

    def _push_one(self) -> None:
        mount = self.mount
        clip = self.clip
        if clip.keyframes[self.cursor] and clip is not mount.clip:
            # switch picture/bit rate at a keyframe: decoders carry on without a glitch
            self.clip = clip = mount.clip
            self.cursor = 0
        buf = clip.buffers[self.cursor].copy_region(
            Gst.BufferCopyFlags.MEMORY | Gst.BufferCopyFlags.FLAGS, 0, clip.sizes[self.cursor]
        )
        buf.pts = buf.dts = self.next_rt
        buf.duration = clip.frame_ns
        if self.appsrc.emit("push-buffer", buf) != Gst.FlowReturn.OK:
            # the media is being torn down (normally "unprepared" tells us first)
            self.dead = True
            return
        mount.pushed += 1
        mount.bytes += clip.sizes[self.cursor]
        self.cursor = (self.cursor + 1) % len(clip.buffers)
        mount.resume_at = self.cursor
        self.next_rt += clip.frame_ns


class Mount:
    """One RTSP path of a camera (``/main``, ``/sub``) and the clip it plays."""

    def __init__(self, camera: Camera, token: str, clip: Clip) -> None:
        self.camera = camera
        self.token = token
        self.label = f"{camera.id}/{token}"
        self.clip = clip
        self.codec = clip.codec
        self.resume_at = 0
        self.feeds: list[Feed] = []
        self.pushed = 0
        self.bytes = 0
        self.factory = self._make_factory()

    def _make_factory(self) -> Any:
        factory = GstRtspServer.RTSPMediaFactory()
        # live appsrc: buffers carry running-time stamps we set; no B-frames, so DTS == PTS
        factory.set_launch(
            f"( appsrc name=src is-live=true format=time do-timestamp=false "
            f"max-bytes=0 caps={_CAPS[self.codec]} ! {_PAYLOADERS[self.codec]} )"
        )
        factory.set_shared(True)
        # TCP or unicast UDP only: multicast could leave the machine on its default interface
        factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP | GstRtsp.RTSPLowerTrans.UDP)
        factory.set_permissions(self.camera.permissions)
        factory.connect("media-configure", self._on_media_configure)
        return factory

    def _on_media_configure(self, _factory: Any, media: Any) -> None:
        appsrc = media.get_element().get_by_name("src")
        feed = Feed(self, media, appsrc)
        self.feeds.append(feed)

        def need_data(_src: Any, _length: int) -> None:
            feed.playing = True  # streaming thread: only flip a flag, the timer does the rest

        feed.need_data_handler = appsrc.connect("need-data", need_data)
        media.connect("unprepared", self._on_unprepared, feed)
        log.info("%s: media started", self.label)

    def _on_unprepared(self, _media: Any, feed: Feed) -> None:
        if feed in self.feeds:
            self.feeds.remove(feed)
            log.info("%s: media stopped", self.label)

    def pump(self, now: int, stalled: bool) -> None:
        for feed in list(self.feeds):
            feed.pump(now, stalled)
            if feed.dead and feed in self.feeds:
                self.feeds.remove(feed)
                log.info("%s: media gone", self.label)

    def resync(self) -> None:
        """Continue at the next keyframe with a fresh timeline (after a stall)."""
        for feed in self.feeds:
            feed.cursor = feed.clip.next_keyframe(feed.cursor)
            feed.resync = True

    def status(self) -> dict[str, Any]:
        return {
            "clip": self.clip.path,
            "codec": self.codec,
            "feeds": len(self.feeds),
            "playing": sum(1 for f in self.feeds if f.playing),
            "pushed": self.pushed,
            "bytes": self.bytes,
        }


class Camera:
    """One camera: its RTSP server, listening socket, credentials and mounts."""

    ROLE = "viewer"

    def __init__(self, req: dict[str, Any], clips: ClipCache) -> None:
        self.id = str(req["camera"])
        self.host = str(req.get("host") or "127.0.0.1")
        self.port = int(req.get("port") or 0)
        self.stalled = bool(req.get("stall", False))
        self.server = GstRtspServer.RTSPServer()
        self.server.set_address(self.host)
        self.server.set_service(str(self.port))
        self.permissions = GstRtspServer.RTSPPermissions()
        self.permissions.add_permission_for_role(self.ROLE, "media.factory.access", True)
        self.permissions.add_permission_for_role(self.ROLE, "media.factory.construct", True)
        self.set_credentials(str(req["user"]), str(req["password"]))
        self.mounts: dict[str, Mount] = {}
        self.source: Any = None
        points = self.server.get_mount_points()
        for token, spec in dict(req.get("mounts") or {}).items():
            clip = clips.get(str(spec["clip"]))
            mount = self.mounts[token] = Mount(self, token, clip)
            points.add_factory("/" + token, mount.factory)

    @property
    def label(self) -> str:
        return f"{self.id} ({self.host}:{self.port})"

    def set_credentials(self, user: str, password: str) -> None:
        """Digest and Basic with the given account; clients connecting later see it."""
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", self.ROLE)
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        auth.add_digest(user, password, token)
        _offer_digest_and_basic(auth)
        auth.set_realm("isocam-sim")
        self.server.set_auth(auth)

    def listen(self) -> None:
        if self.source is not None:
            return
        self.server.set_service(str(self.port))
        try:
            source = self.server.create_source(None)
        except GLib.Error as exc:
            raise CommandError(f"cannot listen on {self.host}:{self.port}: {exc.message}") from exc
        source.attach(None)
        self.source = source
        self.port = self.server.get_bound_port()
        log.info("%s: listening", self.label)

    def unlisten(self) -> None:
        """Close the listening socket (connections are refused from now on)."""
        if self.source is not None:
            # the source holds the server's only socket reference: destroying it closes it
            self.source.destroy()
            self.source = None
            log.info("%s: not listening", self.label)

    def drop_clients(self) -> None:
        """Close every client connection and end every RTSP session (medias stop with them)."""
        remove = GstRtspServer.RTSPFilterResult.REMOVE
        self.server.client_filter(lambda _server, _client, *_: remove)
        pool = self.server.get_session_pool()
        pool.filter(lambda _pool, _session, *_: remove)
        for mount in self.mounts.values():
            mount.resume_at = 0

    def set_clip(self, token: str, clip: Clip) -> None:
        mount = self.mounts.get(token)
        if mount is None:
            raise CommandError(f"camera {self.id} has no mount /{token}")
        if clip.codec != mount.codec:
            # another codec needs another pipeline: replace the mount (its clients drop)
            points = self.server.get_mount_points()
            points.remove_factory("/" + token)
            for feed in list(mount.feeds):
                feed.media.unprepare()
            new = self.mounts[token] = Mount(self, token, clip)
            points.add_factory("/" + token, new.factory)
            log.info("%s/%s: codec changed to %s", self.id, token, clip.codec)
        else:
            mount.clip = clip

    def stall(self, on: bool) -> None:
        if self.stalled and not on:
            for mount in self.mounts.values():
                mount.resync()
        self.stalled = on

    def pump(self, now: int) -> None:
        for mount in self.mounts.values():
            mount.pump(now, self.stalled)

    def close(self) -> None:
        self.unlisten()
        self.drop_clients()

    def status(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "listening": self.source is not None,
            "stalled": self.stalled,
            "mounts": {t: m.status() for t, m in self.mounts.items()},
        }


class Service:
    """All cameras of one simulator, the feeding timer and the stdin command loop."""

    def __init__(self) -> None:
        self.loop = GLib.MainLoop()
        self.cameras: dict[str, Camera] = {}
        self.clips = ClipCache()
        self.clock = Gst.SystemClock.obtain()
        self._inbuf = b""

    def run(self) -> None:
        GLib.timeout_add(_TICK_MS, self._tick)
        GLib.io_add_watch(
            sys.stdin.fileno(), GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR, self._on_stdin
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, self._quit)
        _emit({"event": "ready", "gstreamer": Gst.version_string(), "pid": os.getpid()})
        self.loop.run()
        for cam in self.cameras.values():
            cam.close()
        log.info("stopped")

    def _quit(self) -> bool:
        self.loop.quit()
        return False

    def _tick(self) -> bool:
        now = self.clock.get_time()
        for cam in self.cameras.values():
            try:
                cam.pump(now)
            except Exception:  # keep the other cameras going whatever one feed does
                log.exception("%s: feeding failed", cam.id)
        return True

    def _on_stdin(self, fd: int, condition: int) -> bool:
        chunk = os.read(fd, 65536) if condition & GLib.IO_IN else b""
        if not chunk:
            log.info("stdin closed, shutting down")
            self.loop.quit()
            return False
        self._inbuf += chunk
        while b"\n" in self._inbuf:
            line, self._inbuf = self._inbuf.split(b"\n", 1)
            if line.strip():
                self._handle_line(line)
        return True

    def _handle_line(self, line: bytes) -> None:
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            result = self._dispatch(req)
            _emit({"id": rid, "ok": True, **result})
        except CommandError as exc:
            _emit({"id": rid, "ok": False, "error": str(exc)})
        except (ValueError, KeyError, TypeError) as exc:
            _emit({"id": rid, "ok": False, "error": f"bad request: {exc!r}"})
        except Exception as exc:
            log.exception("request failed: %s", line[:200])
            _emit({"id": rid, "ok": False, "error": f"internal error: {exc!r}"})

    def _camera(self, req: dict[str, Any]) -> Camera:
        cam = self.cameras.get(str(req.get("camera")))
        if cam is None:
            raise CommandError(f"no camera {req.get('camera')!r}")
        return cam

    def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "add":
            if str(req["camera"]) in self.cameras:
                raise CommandError(f"camera {req['camera']} already exists")
            cam = Camera(req, self.clips)
            cam.listen()  # binds even when offline, so a port chosen by the OS is known
            if req.get("offline"):
                cam.unlisten()
            self.cameras[cam.id] = cam
            return {"port": cam.port}
        if cmd == "set_clip":
            cam = self._camera(req)
            cam.set_clip(str(req["mount"]), self.clips.get(str(req["clip"])))
            self._collect_clips()
            return {}
        if cmd == "stall":
            self._camera(req).stall(bool(req["on"]))
            return {}
        if cmd == "offline":
            cam = self._camera(req)
            if req["on"]:
                cam.unlisten()
                cam.drop_clients()
            else:
                cam.listen()
            return {}
        if cmd == "credentials":
            self._camera(req).set_credentials(str(req["user"]), str(req["password"]))
            return {}
        if cmd == "reboot":
            cam = self._camera(req)
            was_listening = cam.source is not None
            cam.unlisten()
            cam.drop_clients()
            if was_listening:
                cam.listen()
            return {}
        if cmd == "remove":
            cam = self._camera(req)
            cam.close()
            del self.cameras[cam.id]
            self._collect_clips()
            return {}
        if cmd == "status":
            return {"cameras": {c.id: c.status() for c in self.cameras.values()}}
        if cmd == "shutdown":
            GLib.idle_add(self._quit)
            return {}
        raise CommandError(f"unknown command {cmd!r}")

    def _collect_clips(self) -> None:
        in_use = {
            clip.path
            for cam in self.cameras.values()
            for m in cam.mounts.values()
            for clip in [m.clip, *(f.clip for f in m.feeds)]
        }
        self.clips.collect(in_use)


def main() -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="rtsp-server %(levelname)s %(message)s"
    )
    error = _load_gstreamer()
    if error:
        _emit({"event": "fatal", "error": error})
        return 3
    Service().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
