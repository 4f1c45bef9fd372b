"""ONVIF device and media services of one virtual camera (SOAP over HTTP), and its snapshot.

Answers what a real Media1 camera answers, so that `onvif-zeep-async` works unmodified:
WS-Security UsernameToken (PasswordDigest verified against the camera's own clock, nonces
not replayable, PasswordText accepted), HTTP Digest/Basic as the alternative ONVIF allows,
and SOAP faults with the ONVIF subcodes (ONVIF Core spec, "Generic faults"). Every answer is
computed from the shared `VirtualCamera`, so a fault switched at run time shows at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web
from lxml import etree
from lxml.builder import ElementMaker

from simulator.camera import StreamProfile, VirtualCamera

_log = logging.getLogger(__name__)

SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
DEVICE_NS = "http://www.onvif.org/ver10/device/wsdl"
MEDIA_NS = "http://www.onvif.org/ver10/media/wsdl"
SCHEMA_NS = "http://www.onvif.org/ver10/schema"
ERROR_NS = "http://www.onvif.org/ver10/error"

DEVICE_PATH = "/onvif/device_service"
MEDIA_PATH = "/onvif/media_service"
SNAPSHOT_PATH = "/snapshot.jpg"

#: Accepted distance between a UsernameToken's Created and the camera clock. ONVIF leaves the
#: window to the device; 5 min is what common firmware uses, and it is far below the skews
#: the `clock-skew` fault makes, so a client that does not adjust for the clock is refused.
WSSE_WINDOW_S = 300.0
#: Lifetime of an HTTP Digest server nonce, on the camera's clock (RFC 7616 §3.3 leaves it
#: to the server). An expired nonce with a correct response gets `stale=true`.
DIGEST_NONCE_LIFETIME_S = 300.0
#: ONVIF version the services claim (GetServices, GetCapabilities).
_ONVIF_VERSION = (2, 60)
#: Vietnam is UTC+7 without daylight saving; POSIX TZ spells that "ICT-7".
_TZ_POSIX, _TZ_OFFSET = "ICT-7", timedelta(hours=7)
#: Bound on remembered WS-Security nonces; old ones are useless anyway once their Created
#: time has left the window.
_NONCE_CACHE_MAX = 50_000

_NSMAP = {"tds": DEVICE_NS, "trt": MEDIA_NS, "tt": SCHEMA_NS, "ter": ERROR_NS}
_TDS = ElementMaker(namespace=DEVICE_NS, nsmap=_NSMAP)
_TRT = ElementMaker(namespace=MEDIA_NS, nsmap=_NSMAP)
_TT = ElementMaker(namespace=SCHEMA_NS, nsmap=_NSMAP)

Snapshot = Callable[[VirtualCamera], bytes]


def onvif_scopes(cam: VirtualCamera) -> list[tuple[str, bool]]:
    """The camera's ONVIF scopes as (URI, fixed); shared by GetScopes and WS-Discovery."""
    base = "onvif://www.onvif.org"
    return [
        (f"{base}/type/video_encoder", True),
        (f"{base}/Profile/Streaming", True),
        (f"{base}/hardware/{quote(cam.hardware_id, safe='')}", True),
        (f"{base}/name/{quote(cam.name, safe='')}", False),
        (f"{base}/location/{quote(cam.location, safe='')}", False),
    ]


def device_xaddr(cam: VirtualCamera) -> str:
    """Where the device service answers; also the WS-Discovery XAddrs."""
    return cam.onvif_url


def media_xaddr(cam: VirtualCamera) -> str:
    """Where the media service answers (GetServices, GetCapabilities)."""
    return f"http://{cam.host}:{cam.onvif_port}{MEDIA_PATH}"


# --- faults ----------------------------------------------------------------------------------


class _SoapFault(Exception):
    """An ONVIF fault: env:Sender/env:Receiver plus nested ter: subcodes."""

    def __init__(
        self,
        code: str,
        subcodes: tuple[str, ...],
        reason: str,
        status: int,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.subcodes = subcodes
        self.reason = reason
        # SOAP 1.2 part 2 §7.5.2.2: a Sender fault travels with HTTP 400, a Receiver one with 500
        self.status = status
        self.headers = headers or []


def _not_authorized(
    reason: str, status: int = 400, headers: list[tuple[str, str]] | None = None
) -> _SoapFault:
    return _SoapFault(
        "Sender", ("NotAuthorized",), f"Sender not authorized: {reason}", status, headers
    )


def _action_not_supported(what: str) -> _SoapFault:
    return _SoapFault(
        "Receiver", ("ActionNotSupported",), f"Optional action not implemented: {what}", 500
    )


# --- WS-Security UsernameToken ---------------------------------------------------------------


def _parse_created(text: str) -> datetime:
    """Parse xs:dateTime leniently ("Z", "+00:00", fractions; no zone counts as UTC)."""
    value = datetime.fromisoformat(text.strip())
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class _UsernameTokenVerifier:
    """Checks WS-Security UsernameTokens (OASIS UsernameToken Profile 1.0) for one camera."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._seen: dict[bytes, float] = {}  # nonce -> camera time after which it may be forgotten

    def verify(self, cam: VirtualCamera, header: Any) -> bool:
        """True if a valid token is present, False if there is none; raises NotAuthorized."""
        token = header.find(".//{*}UsernameToken") if header is not None else None
        if token is None:
            return False
        user = (token.findtext("{*}Username") or "").strip()
        password_el = token.find("{*}Password")
        if password_el is None:
            raise _not_authorized("UsernameToken has no Password")
        password = (password_el.text or "").strip()
        kind = password_el.get("Type", "")
        created_text = (token.findtext("{*}Created") or "").strip()
        nonce_text = (token.findtext("{*}Nonce") or "").strip()
        now = cam.now()
        if created_text:
            try:
                created = _parse_created(created_text).timestamp()
            except ValueError:
                raise _not_authorized(f"unreadable Created time {created_text!r}") from None
            if abs(created - now) > self._window_s:
                camera_time = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
                raise _not_authorized(
                    f"message Created {created_text} is more than {self._window_s:.0f} s "
                    f"from the camera clock {camera_time} (adjust for the camera's time)"
                )
        if kind.endswith("#PasswordDigest"):
            if not created_text or not nonce_text:
                raise _not_authorized("PasswordDigest needs Nonce and Created")
            try:
                nonce = base64.b64decode(nonce_text, validate=True)
            except (binascii.Error, ValueError):
                raise _not_authorized("Nonce is not Base64") from None
            expected = base64.b64encode(
                hashlib.sha1(  # noqa: S324 - SHA-1 is what the UsernameToken profile specifies
                    nonce + created_text.encode() + cam.effective_password.encode()
                ).digest()
            ).decode()
            ok = hmac.compare_digest(expected, password)
        elif kind == "" or kind.endswith("#PasswordText"):
            nonce = nonce_text.encode() if nonce_text else b""
            ok = hmac.compare_digest(password.encode(), cam.effective_password.encode())
        else:
            raise _not_authorized(f"unsupported password type {kind!r}")
        if user != cam.user or not ok:
            raise _not_authorized("wrong username or password")
        if nonce:
            self._remember(nonce, now)
        return True

    def _remember(self, nonce: bytes, now: float) -> None:
        if nonce in self._seen:
            raise _not_authorized("nonce already used (replayed message)")
        if len(self._seen) >= _NONCE_CACHE_MAX:
            self._seen = {n: t for n, t in self._seen.items() if t > now}
            while len(self._seen) >= _NONCE_CACHE_MAX:  # all still fresh: drop the oldest
                del self._seen[next(iter(self._seen))]
        # a message with this nonce is refused by the window once Created is 2 windows old
        self._seen[nonce] = now + 2 * self._window_s


# --- HTTP Digest (RFC 7616) and Basic (RFC 7617) ---------------------------------------------

_AUTH_PARAM = re.compile(r'([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_DIGEST_HASHES: dict[str, Callable[[bytes], Any]] = {
    "MD5": hashlib.md5,
    "SHA-256": hashlib.sha256,
}


def _h(algorithm: str, text: str) -> str:
    return str(_DIGEST_HASHES[algorithm](text.encode()).hexdigest())


class _HttpAuthenticator:
    """HTTP Digest (MD5 or SHA-256, qop=auth) and Basic against the camera's credentials.

    Server nonces are stateless: the camera clock time they were issued at plus an HMAC, so
    they survive nothing but this app instance (a reboot invalidates them, as on a camera).
    """

    def __init__(self, cam: VirtualCamera, lifetime_s: float) -> None:
        self._cam = cam
        self._lifetime_s = lifetime_s
        self._secret = secrets.token_bytes(32)
        self._opaque = secrets.token_hex(16)
        self.realm = f"{cam.manufacturer} {cam.serial}"

    def _nonce(self) -> str:
        issued = f"{int(self._cam.now()):x}"
        sig = hmac.new(self._secret, issued.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{issued}.{sig}"

    def _nonce_age(self, nonce: str) -> float | None:
        """Seconds since a nonce of ours was issued; None if it is not ours."""
        issued, _, sig = nonce.partition(".")
        good = hmac.new(self._secret, issued.encode(), hashlib.sha256).hexdigest()[:32]
        if not hmac.compare_digest(sig, good):
            return None
        try:
            return self._cam.now() - int(issued, 16)
        except ValueError:
            return None

    def challenge(self, stale: bool = False) -> list[tuple[str, str]]:
        """WWW-Authenticate headers: Digest first (clients take the first), then Basic."""
        digest = (
            f'Digest realm="{self.realm}", qop="auth", algorithm=MD5, '
            f'nonce="{self._nonce()}", opaque="{self._opaque}"'
        )
        if stale:
            digest += ", stale=true"
        return [("WWW-Authenticate", digest), ("WWW-Authenticate", f'Basic realm="{self.realm}"')]

    def check(self, request: web.BaseRequest) -> str:
        """One of "ok", "missing", "stale" (right answer, expired nonce) or "bad"."""
        header = request.headers.get("Authorization", "")
        scheme, _, rest = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                raw = base64.b64decode(rest.strip(), validate=True)
            except (binascii.Error, ValueError):
                return "bad"
            try:
                decoded = raw.decode()
            except UnicodeDecodeError:  # RFC 7617 leaves the charset open; old clients: Latin-1
                decoded = raw.decode("latin-1")
            user, _, password = decoded.partition(":")
            good = hmac.compare_digest(password.encode(), self._cam.effective_password.encode())
            return "ok" if user == self._cam.user and good else "bad"
        if scheme == "digest":
            return self._check_digest(request, rest)
        return "missing"

    def _check_digest(self, request: web.BaseRequest, rest: str) -> str:
        params = {
            m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _AUTH_PARAM.finditer(rest)
        }
        algorithm = params.get("algorithm", "MD5").upper()
        nonce, uri = params.get("nonce", ""), params.get("uri", "")
        if (
            algorithm not in _DIGEST_HASHES
            or params.get("username") != self._cam.user
            or params.get("realm") != self.realm
            or unquote(urlsplit(uri).path) != unquote(request.path)
        ):
            return "bad"
        age = self._nonce_age(nonce)
        if age is None:
            return "bad"
        ha1 = _h(algorithm, f"{self._cam.user}:{self.realm}:{self._cam.effective_password}")
        ha2 = _h(algorithm, f"{request.method}:{uri}")
        qop = params.get("qop")
        if qop == "auth":
            nc, cnonce = params.get("nc", ""), params.get("cnonce", "")
            expected = _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        elif qop is None:  # RFC 2069 clients
            expected = _h(algorithm, f"{ha1}:{nonce}:{ha2}")
        else:
            return "bad"
        if not hmac.compare_digest(expected, params.get("response", "")):
            return "bad"
        # a nonce "from the future" means the camera clock was set back: also stale
        return "ok" if -5 <= age <= self._lifetime_s else "stale"


# --- SOAP plumbing ---------------------------------------------------------------------------

_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=True
)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _envelope(soap_ns: str, body_child: Any) -> bytes:
    env = ElementMaker(namespace=soap_ns, nsmap={"env": soap_ns, **_NSMAP})
    doc = env.Envelope(env.Header(), env.Body(body_child))
    etree.cleanup_namespaces(doc, top_nsmap={"env": soap_ns, **_NSMAP})
    return bytes(etree.tostring(doc, xml_declaration=True, encoding="UTF-8"))


def _fault_envelope(soap_ns: str, fault: _SoapFault) -> bytes:
    env = ElementMaker(namespace=soap_ns, nsmap={"env": soap_ns, "ter": ERROR_NS})
    if soap_ns == SOAP11_NS:
        code = f"ter:{fault.subcodes[-1]}" if fault.subcodes else f"env:{fault.code}"
        body = env.Fault(
            etree.Element("faultcode"), etree.Element("faultstring")
        )  # SOAP 1.1 fault children are unqualified
        body[0].text, body[1].text = code, fault.reason
    else:
        code_el = env.Code(env.Value(f"env:{fault.code}"))
        parent = code_el
        for sub in fault.subcodes:
            sub_el = env.Subcode(env.Value(f"ter:{sub}"))
            parent.append(sub_el)
            parent = sub_el
        text = env.Text(fault.reason)
        text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
        body = env.Fault(code_el, env.Reason(text))
    doc = env.Envelope(env.Body(body))
    return bytes(etree.tostring(doc, xml_declaration=True, encoding="UTF-8"))


def _param(op: Any, name: str) -> str | None:
    """Text of the first child element of the operation with this local name."""
    found = op.find(f"{{*}}{name}")
    return None if found is None or found.text is None else str(found.text).strip()


# --- device service ----------------------------------------------------------------------------


def _version() -> Any:
    return _TT.Major(_text(_ONVIF_VERSION[0])), _TT.Minor(_text(_ONVIF_VERSION[1]))


def _tds_version() -> Any:
    major, minor = _version()
    return _TDS.Version(major, minor)


def _date_time(kind: Callable[..., Any], moment: datetime) -> Any:
    return kind(
        _TT.Time(
            _TT.Hour(_text(moment.hour)),
            _TT.Minute(_text(moment.minute)),
            _TT.Second(_text(moment.second)),
        ),
        _TT.Date(
            _TT.Year(_text(moment.year)),
            _TT.Month(_text(moment.month)),
            _TT.Day(_text(moment.day)),
        ),
    )


def _get_system_date_and_time(cam: VirtualCamera, op: Any) -> Any:
    utc = datetime.fromtimestamp(cam.now(), UTC)
    return _TDS.GetSystemDateAndTimeResponse(
        _TDS.SystemDateAndTime(
            _TT.DateTimeType("Manual"),
            _TT.DaylightSavings("false"),
            _TT.TimeZone(_TT.TZ(_TZ_POSIX)),
            _date_time(_TT.UTCDateTime, utc),
            _date_time(_TT.LocalDateTime, utc + _TZ_OFFSET),
        )
    )


def _get_device_information(cam: VirtualCamera, op: Any) -> Any:
    return _TDS.GetDeviceInformationResponse(
        _TDS.Manufacturer(cam.manufacturer),
        _TDS.Model(cam.model),
        _TDS.FirmwareVersion(cam.firmware),
        _TDS.SerialNumber(cam.serial),
        _TDS.HardwareId(cam.hardware_id),
    )


def _device_capabilities(cam: VirtualCamera) -> Any:
    major, minor = _version()
    return _TT.Device(
        _TT.XAddr(device_xaddr(cam)),
        _TT.Network(
            _TT.IPFilter("false"),
            _TT.ZeroConfiguration("false"),
            _TT.IPVersion6("false"),
            _TT.DynDNS("false"),
        ),
        _TT.System(
            _TT.DiscoveryResolve("false"),
            _TT.DiscoveryBye("true"),
            _TT.RemoteDiscovery("false"),
            _TT.SystemBackup("false"),
            _TT.SystemLogging("false"),
            _TT.FirmwareUpgrade("false"),
            _TT.SupportedVersions(major, minor),
        ),
    )


def _media_capabilities(cam: VirtualCamera) -> Any:
    return _TT.Media(
        _TT.XAddr(media_xaddr(cam)),
        _TT.StreamingCapabilities(
            _TT.RTPMulticast("false"), _TT.RTP_TCP("true"), _TT.RTP_RTSP_TCP("true")
        ),
    )


def _get_capabilities(cam: VirtualCamera, op: Any) -> Any:
    asked = {str(c.text).strip() for c in op.iterfind("{*}Category") if c.text} or {"All"}
    parts = []
    if asked & {"All", "Device"}:
        parts.append(_device_capabilities(cam))
    if asked & {"All", "Media"}:
        parts.append(_media_capabilities(cam))
    if not parts:
        raise _SoapFault(
            "Receiver",
            ("ActionNotSupported", "NoSuchService"),
            f"No such service: {', '.join(sorted(asked))}",
            500,
        )
    return _TDS.GetCapabilitiesResponse(_TDS.Capabilities(*parts))


def _device_service_capabilities() -> Any:
    return _TDS.Capabilities(
        _TDS.Network(IPFilter="false", ZeroConfiguration="false", IPVersion6="false"),
        _TDS.Security(UsernameToken="true", HttpDigest="true"),
        _TDS.System(DiscoveryResolve="false", DiscoveryBye="true", RemoteDiscovery="false"),
    )


def _media_service_capabilities() -> Any:
    return _TRT.Capabilities(
        _TRT.ProfileCapabilities(MaximumNumberOfProfiles="2"),
        _TRT.StreamingCapabilities(RTPMulticast="false", RTP_TCP="true", RTP_RTSP_TCP="true"),
        SnapshotUri="true",
        Rotation="false",
    )


def _get_services(cam: VirtualCamera, op: Any) -> Any:
    with_caps = (_param(op, "IncludeCapability") or "false").lower() in ("true", "1")
    services = []
    for ns, xaddr, caps in (
        (DEVICE_NS, device_xaddr(cam), _device_service_capabilities),
        (MEDIA_NS, media_xaddr(cam), _media_service_capabilities),
    ):
        children = [_TDS.Namespace(ns), _TDS.XAddr(xaddr)]
        if with_caps:
            children.append(_TDS.Capabilities(caps()))
        children.append(_tds_version())
        services.append(_TDS.Service(*children))
    return _TDS.GetServicesResponse(*services)


def _get_device_service_capabilities(cam: VirtualCamera, op: Any) -> Any:
    return _TDS.GetServiceCapabilitiesResponse(_device_service_capabilities())


def _get_scopes(cam: VirtualCamera, op: Any) -> Any:
    return _TDS.GetScopesResponse(
        *(
            _TDS.Scopes(_TT.ScopeDef("Fixed" if fixed else "Configurable"), _TT.ScopeItem(uri))
            for uri, fixed in onvif_scopes(cam)
        )
    )


def _get_hostname(cam: VirtualCamera, op: Any) -> Any:
    return _TDS.GetHostnameResponse(
        _TDS.HostnameInformation(_TT.FromDHCP("false"), _TT.Name(cam.id))
    )


# --- media service -----------------------------------------------------------------------------

_VIDEO_SOURCE = "VideoSource_1"  # ONVIF ReferenceTokens, not secrets
_VIDEO_SOURCE_CONFIG = "VideoSourceConfig_1"
_PROFILE_NAMES = {"main": "MainStream", "sub": "SubStream"}


def _largest(cam: VirtualCamera) -> StreamProfile:
    return max(cam.profiles, key=lambda p: p.width * p.height)


def _video_source_configuration(cam: VirtualCamera) -> Any:
    big = _largest(cam)
    return _TT.VideoSourceConfiguration(
        _TT.Name("VideoSourceConfig"),
        _TT.UseCount(_text(len(cam.profiles))),
        _TT.SourceToken(_VIDEO_SOURCE),
        _TT.Bounds(x="0", y="0", width=_text(big.width), height=_text(big.height)),
        token=_VIDEO_SOURCE_CONFIG,
    )


def _video_encoder_configuration(cam: VirtualCamera, p: StreamProfile) -> Any:
    children = [
        _TT.Name(f"VideoEncoder_{p.token}"),
        _TT.UseCount("1"),
        # Media1's schema knows JPEG/MPEG4/H264 only; H.265 cameras on Media1 report "H265"
        # here anyway, and zeep (strict=False) hands the string through.
        _TT.Encoding(p.codec),
        _TT.Resolution(_TT.Width(_text(p.width)), _TT.Height(_text(p.height))),
        _TT.Quality("5"),
        _TT.RateControl(
            _TT.FrameRateLimit(_text(p.fps)),
            _TT.EncodingInterval("1"),
            _TT.BitrateLimit(_text(cam.current_bitrate_kbps(p.token))),
        ),
    ]
    if p.codec == "H264":
        children.append(_TT.H264(_TT.GovLength(_text(p.gop)), _TT.H264Profile("Main")))
    children += [
        _TT.Multicast(
            _TT.Address(_TT.Type("IPv4"), _TT.IPv4Address("0.0.0.0")),  # noqa: S104 - "none"
            _TT.Port("0"),
            _TT.TTL("1"),
            _TT.AutoStart("false"),
        ),
        _TT.SessionTimeout("PT60S"),
    ]
    if p.codec == "H265":  # GOP has no Media1 element for H.265: carried in the xs:any tail
        children.append(_TT.H265(_TT.GovLength(_text(p.gop)), _TT.H265Profile("Main")))
    return _TT.VideoEncoderConfiguration(*children, token=f"VideoEncoder_{p.token}")


def _profile(cam: VirtualCamera, p: StreamProfile, tag: Callable[..., Any]) -> Any:
    return tag(
        _TT.Name(_PROFILE_NAMES.get(p.token, p.token)),
        _video_source_configuration(cam),
        _video_encoder_configuration(cam, p),
        token=p.token,
        fixed="true",
    )


def _profile_for(cam: VirtualCamera, op: Any) -> StreamProfile:
    token = _param(op, "ProfileToken")
    try:
        return cam.profile(token or "")
    except KeyError:
        raise _SoapFault(
            "Sender",
            ("InvalidArgVal", "NoProfile"),
            f"The requested profile token {token!r} does not exist",
            400,
        ) from None


def _get_profiles(cam: VirtualCamera, op: Any) -> Any:
    return _TRT.GetProfilesResponse(*(_profile(cam, p, _TRT.Profiles) for p in cam.profiles))


def _get_profile(cam: VirtualCamera, op: Any) -> Any:
    return _TRT.GetProfileResponse(_profile(cam, _profile_for(cam, op), _TRT.Profile))


def _media_uri(uri: str) -> Any:
    return _TRT.MediaUri(
        _TT.Uri(uri),
        _TT.InvalidAfterConnect("false"),
        _TT.InvalidAfterReboot("false"),
        _TT.Timeout("PT0S"),
    )


def _get_stream_uri(cam: VirtualCamera, op: Any) -> Any:
    p = _profile_for(cam, op)
    return _TRT.GetStreamUriResponse(_media_uri(cam.rtsp_url(p.token)))


def _get_snapshot_uri(cam: VirtualCamera, op: Any) -> Any:
    _profile_for(cam, op)
    return _TRT.GetSnapshotUriResponse(_media_uri(cam.snapshot_url))


def _get_video_sources(cam: VirtualCamera, op: Any) -> Any:
    big = _largest(cam)
    return _TRT.GetVideoSourcesResponse(
        _TRT.VideoSources(
            _TT.Framerate(_text(float(big.fps))),
            _TT.Resolution(_TT.Width(_text(big.width)), _TT.Height(_text(big.height))),
            token=_VIDEO_SOURCE,
        )
    )


def _get_media_service_capabilities(cam: VirtualCamera, op: Any) -> Any:
    return _TRT.GetServiceCapabilitiesResponse(_media_service_capabilities())


_Handler = Callable[[VirtualCamera, Any], Any]
_OPERATIONS: dict[tuple[str, str], _Handler] = {
    (DEVICE_NS, "GetSystemDateAndTime"): _get_system_date_and_time,
    (DEVICE_NS, "GetDeviceInformation"): _get_device_information,
    (DEVICE_NS, "GetCapabilities"): _get_capabilities,
    (DEVICE_NS, "GetServices"): _get_services,
    (DEVICE_NS, "GetServiceCapabilities"): _get_device_service_capabilities,
    (DEVICE_NS, "GetScopes"): _get_scopes,
    (DEVICE_NS, "GetHostname"): _get_hostname,
    (MEDIA_NS, "GetProfiles"): _get_profiles,
    (MEDIA_NS, "GetProfile"): _get_profile,
    (MEDIA_NS, "GetStreamUri"): _get_stream_uri,
    (MEDIA_NS, "GetSnapshotUri"): _get_snapshot_uri,
    (MEDIA_NS, "GetVideoSources"): _get_video_sources,
    (MEDIA_NS, "GetServiceCapabilities"): _get_media_service_capabilities,
}
#: Operations answered without credentials (ONVIF Core, access class PRE_AUTH). Credentials
#: that are sent anyway must still be right, as on most firmware.
_PRE_AUTH = {
    (DEVICE_NS, "GetSystemDateAndTime"),
    (DEVICE_NS, "GetCapabilities"),
    (DEVICE_NS, "GetServices"),
    (DEVICE_NS, "GetServiceCapabilities"),
    (DEVICE_NS, "GetHostname"),
}
#: Never checked at all: a client asks the time precisely because its own signature may be
#: outside the clock window (onvif-zeep-async `adjust_time`).
_NEVER_CHECKED = {(DEVICE_NS, "GetSystemDateAndTime")}


@dataclass
class _Services:
    cam: VirtualCamera
    snapshot: Snapshot
    wsse: _UsernameTokenVerifier
    http_auth: _HttpAuthenticator


def _authenticate(
    svc: _Services, request: web.BaseRequest, key: tuple[str, str], header: Any
) -> None:
    """Raise NotAuthorized unless this call may proceed."""
    if key in _NEVER_CHECKED:
        return
    if svc.wsse.verify(svc.cam, header):
        return
    outcome = svc.http_auth.check(request)
    if outcome == "ok" or (outcome == "missing" and key in _PRE_AUTH):
        return
    # no or wrong HTTP credentials: 401 with a challenge (ONVIF Core, HTTP digest), the fault
    # in the body for clients that speak WS-Security only
    reason = {
        "missing": "credentials required (WS-Security UsernameToken or HTTP Digest)",
        "stale": "HTTP Digest nonce expired",
    }.get(outcome, "wrong username or password")
    raise _not_authorized(reason, 401, svc.http_auth.challenge(stale=outcome == "stale"))


async def _handle_soap(request: web.Request) -> web.Response:
    svc: _Services = request.app[_SERVICES_KEY]
    body = await request.read()
    soap_ns = SOAP12_NS
    try:
        try:
            root = etree.fromstring(body, _PARSER)
        except etree.XMLSyntaxError as err:
            raise _SoapFault("Sender", ("WellFormed",), f"Malformed XML: {err}", 400) from None
        qname = etree.QName(root)
        if qname.localname != "Envelope" or qname.namespace not in (SOAP12_NS, SOAP11_NS):
            raise _SoapFault("Sender", ("WellFormed",), "Not a SOAP envelope", 400)
        soap_ns = str(qname.namespace)
        header = root.find(f"{{{soap_ns}}}Header")
        body_el = root.find(f"{{{soap_ns}}}Body")
        op = (
            next((c for c in body_el if isinstance(c.tag, str)), None)
            if body_el is not None
            else None
        )
        if op is None:
            raise _SoapFault("Sender", ("WellFormed",), "SOAP Body holds no operation", 400)
        op_name = etree.QName(op)
        key = (str(op_name.namespace or ""), str(op_name.localname))
        if not key[0]:  # unqualified operation element: be lenient, look the name up
            key = next((k for k in _OPERATIONS if k[1] == key[1]), key)
        _authenticate(svc, request, key, header)
        handler = _OPERATIONS.get(key)
        if handler is None:
            raise _action_not_supported(f"{key[1]} ({key[0] or 'no namespace'})")
        payload = _envelope(soap_ns, handler(svc.cam, op))
        status, headers = 200, []
    except _SoapFault as fault:
        _log.info("%s: SOAP fault %s: %s", svc.cam.id, "/".join(fault.subcodes), fault.reason)
        payload, status, headers = _fault_envelope(soap_ns, fault), fault.status, fault.headers
    content_type = "application/soap+xml" if soap_ns == SOAP12_NS else "text/xml"
    response = web.Response(body=payload, status=status, content_type=content_type, charset="utf-8")
    for name, value in headers:
        response.headers.add(name, value)
    return response


async def _handle_snapshot(request: web.Request) -> web.Response:
    svc: _Services = request.app[_SERVICES_KEY]
    outcome = svc.http_auth.check(request)
    if outcome != "ok":
        response = web.Response(status=401, text="401 Unauthorized\n")
        for name, value in svc.http_auth.challenge(stale=outcome == "stale"):
            response.headers.add(name, value)
        return response
    # rendering a JPEG is CPU work; keep the event loop (other cameras) responsive
    jpeg = await asyncio.to_thread(svc.snapshot, svc.cam)
    return web.Response(body=jpeg, content_type="image/jpeg")


_SERVICES_KEY = web.AppKey("onvif_services", _Services)


def make_onvif_app(
    cam: VirtualCamera,
    snapshot: Snapshot,
    *,
    wsse_window_s: float = WSSE_WINDOW_S,
    digest_nonce_lifetime_s: float = DIGEST_NONCE_LIFETIME_S,
) -> web.Application:
    """The HTTP side of one camera: ONVIF device + media services and `GET /snapshot.jpg`.

    Any POST under `/onvif/` reaches the same dispatcher (operations are told apart by their
    namespace), as on most firmware; `snapshot(cam)` renders the JPEG for the snapshot URI.
    """
    app = web.Application(client_max_size=256 * 1024)
    app[_SERVICES_KEY] = _Services(
        cam=cam,
        snapshot=snapshot,
        wsse=_UsernameTokenVerifier(wsse_window_s),
        http_auth=_HttpAuthenticator(cam, digest_nonce_lifetime_s),
    )
    app.router.add_post(DEVICE_PATH, _handle_soap)
    app.router.add_post(MEDIA_PATH, _handle_soap)
    app.router.add_post("/onvif/{tail:.*}", _handle_soap)
    app.router.add_get(SNAPSHOT_PATH, _handle_snapshot)
    return app


class OnvifServer:
    """Runs one camera's ONVIF/snapshot HTTP site; stop makes its port refuse connections.

    Each start serves a fresh app (as after a reboot: HTTP Digest nonces and the WS-Security
    nonce cache are new). The bound port is written back to `cam.onvif_port`, so every URL
    the camera advertises (XAddrs, snapshot URI, WS-Discovery) names the port really served.
    """

    def __init__(self, cam: VirtualCamera, snapshot: Snapshot, **app_options: float) -> None:
        self.cam = cam
        self._snapshot = snapshot
        self._app_options = app_options
        self._runner: web.AppRunner | None = None

    @property
    def running(self) -> bool:
        """True between start() and stop(): the port accepts connections."""
        return self._runner is not None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port) and return the bound port."""
        if self._runner is not None:
            raise RuntimeError(f"{self.cam.id}: ONVIF server already running")
        app = make_onvif_app(self.cam, self._snapshot, **self._app_options)
        # a short shutdown: stop() must make the camera vanish, not drain politely for 60 s
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = int(runner.addresses[0][1])
        self.cam.onvif_port = bound
        return bound

    async def stop(self) -> None:
        """Close the listening socket and every open connection; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
