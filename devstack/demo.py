"""The one-machine demo: a private Mosquitto, simulated cameras, the edge agent and the hub.

Run through `scripts/demo.sh`. Everything lives under .demo/ in the checkout and stops on Ctrl-C.
The hub (NOC board, API, accounts) listens on http://127.0.0.1:8080 (another free port if that
one is taken); the demo site is enrolled with the edge box's device key, and two accounts are
made on the first run and printed on every run: a NOC operator (nation-wide, no second factor)
and a superadmin (sets up TOTP at its first login). Their passwords are kept in
.demo/hub/accounts.txt (0600).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from devstack.broker import BrokerUnavailable, Mosquitto
from devstack.ports import free_port
from devstack.simulator import launch_simulator

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / ".demo"
BIN = Path(sys.executable).parent
SITE_ID = "hcm-q7-kcl01"
NOC_EMAIL = "noc@demo.gov.vn"
ADMIN_EMAIL = "admin@demo.gov.vn"


def write_edge_config(cams: list[dict[str, str]], broker_url: str) -> Path:
    """The demo box's edge.toml: the simulated cameras pinned by ONVIF address (no multicast
    leaves this machine), a viewing key pair made once under .demo/keys."""
    keys = DEMO_DIR / "keys"
    keys.mkdir(exist_ok=True)
    if not (keys / "viewer.pub").exists():
        subprocess.run(
            [str(BIN / "central-hub"), "keygen", str(keys / "viewer")], check=True, timeout=60
        )
    edge = DEMO_DIR / "edge"
    edge.mkdir(exist_ok=True)
    lines = [
        "# written by the demo (devstack/demo.py); see deploy/edge.example.toml",
        "[site]",
        f'id = "{SITE_ID}"',
        'name = "Khu cách ly tập trung Quận 7 (demo)"',
        'province = "Hồ Chí Minh"',
        'district = "Quận 7"',
        'kind = "facility"',
        'authority = "health"',
        'operator = "vnpt"',
        "[storage]",
        f'data_dir = "{edge / "data"}"',
        "reserve_gib = 0.5",
        "[credentials]",
        f'user = "{cams[0]["user"]}"',
        f'password = "{cams[0]["password"]}"',
        "[discovery]",
        "enabled = false",
        "[mqtt]",
        f'url = "{broker_url}"',
        "[keys]",
        f'recipient_files = ["{keys / "viewer.pub"}"]',
        "[status]",
        f'socket = "{edge / "edge.sock"}"',
    ]
    for cam in cams:
        lines += ["[[cameras.onvif]]", f'address = "{cam["onvif_url"].split("/")[2]}"']
    path = edge / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_hub_config(broker_url: str) -> tuple[Path, str]:
    """.demo/hub/hub.toml (its auth secret made once and kept) and the hub's address."""
    hub = DEMO_DIR / "hub"
    hub.mkdir(exist_ok=True)
    secret_file = hub / "auth-secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
    port = 8080 if _port_free(8080) else free_port()
    url = f"http://127.0.0.1:{port}"
    keys = DEMO_DIR / "keys"
    if not (keys / "hub-signing.key").exists():
        subprocess.run(
            [str(BIN / "central-hub"), "export", "keygen", str(keys / "hub-signing.key")],
            check=True,
            timeout=60,
            stdout=subprocess.DEVNULL,
        )
    lines = [
        "# written by the demo (devstack/demo.py); see docs/hub.md and docs/security.md",
        "[database]",
        f'url = "sqlite:///{hub / "hub.db"}"',
        "[mqtt]",
        f'url = "{broker_url}"',
        'client_id = "central-hub-demo"',
        "[tickets]",
        "threshold_minutes = 1",  # short, so a fault injected in the demo soon gets a ticket
        "check_interval_seconds = 5",
        "[web]",
        f'listen = "127.0.0.1:{port}"',
        f'public_url = "{url}"',
        "[viewing]",
        f'key_file = "{keys / "viewer.key"}"',
        f'signing_key_file = "{keys / "hub-signing.key"}"',
        "[auth]",
        "cookie_secure = false",  # plain http on loopback: the demo has no TLS proxy
        f'secret = "{secret_file.read_text().strip()}"',
    ]
    path = hub / "hub.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, url


def enrol_site(hub_config: Path, edge_config: Path) -> None:
    """Enrol the demo site with its box's device key (once; later runs find it enrolled)."""
    key = DEMO_DIR / "hub" / "device-key.pem"
    out = subprocess.run(
        [str(BIN / "edge-agent"), "device-key", "--config", str(edge_config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key.write_text(out.stdout)
    done = subprocess.run(
        [
            str(BIN / "central-hub"),
            "sites",
            "--config",
            str(hub_config),
            "add",
            SITE_ID,
            "--province",
            "Hồ Chí Minh",
            "--district",
            "Quận 7",
            "--kind",
            "facility",
            "--authority",
            "health",
            "--operator",
            "vnpt",
            "--name",
            "Khu cách ly tập trung Quận 7 (demo)",
            "--device-key",
            str(key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 and "already enrolled" not in done.stderr:
        raise RuntimeError(f"central-hub sites add failed: {done.stderr.strip()}")


def make_accounts(hub_config: Path) -> dict[str, str]:
    """The demo's NOC operator and superadmin (made once); returns email → password."""
    from central_hub.accounts import AccountStore
    from central_hub.audit import AuditLog
    from central_hub.cli import load_hub_config
    from central_hub.db import Database
    from central_hub.policy import Scope

    accounts = DEMO_DIR / "hub" / "accounts.txt"
    if accounts.exists():
        return dict(line.split(" ", 1) for line in accounts.read_text().splitlines() if line)
    config, auth = load_hub_config(hub_config)
    passwords = {NOC_EMAIL: secrets.token_urlsafe(12), ADMIN_EMAIL: secrets.token_urlsafe(12)}
    subprocess.run(
        [
            str(BIN / "central-hub"),
            "users",
            "create-superadmin",
            "--db",
            config.database.url,
            "--email",
            ADMIN_EMAIL,
            "--name",
            "Quản trị demo",
            "--password-stdin",
        ],
        input=passwords[ADMIN_EMAIL] + "\n",
        text=True,
        timeout=60,
        check=True,
        capture_output=True,
    )
    db = Database.connect(config.database.url)
    db.migrate()
    try:
        # No CLI makes ordinary accounts (the web registration workflow does); the demo uses
        # the store directly, as the console would. A NOC role sees no footage: no TOTP.
        AccountStore(db, AuditLog(db), auth).create_user(
            NOC_EMAIL, "Trực ban NOC (demo)", passwords[NOC_EMAIL], "noc", Scope.nation()
        )
    finally:
        db.close()
    accounts.write_text("".join(f"{e} {p}\n" for e, p in passwords.items()))
    accounts.chmod(0o600)
    return passwords


def wait_http(url: str, proc: subprocess.Popen[str], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {within:.0f} s")
        time.sleep(0.2)  # polling a port: there is no event to wait for


def main() -> int:
    DEMO_DIR.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    broker = Mosquitto(workdir=DEMO_DIR / "mosquitto")
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        try:
            broker.start()
        except BrokerUnavailable as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        print(f"demo: Mosquitto broker on {broker.url}", flush=True)
        state_file = DEMO_DIR / "camera-sim.json"
        sim, cams = launch_simulator(state_file, cameras=4)
        procs.append(sim)
        env_hint = f"--state-file {state_file}"
        print("demo: 4 simulated ONVIF cameras:", flush=True)
        for cam in cams:
            print(
                f"  {cam['id']}  {cam['onvif_url']}  {cam['rtsp_main']}  "
                f"user {cam['user']} / {cam['password']}",
                flush=True,
            )
        edge_config = write_edge_config(cams, broker.url)
        hub_config, hub_url = write_hub_config(broker.url)
        enrol_site(hub_config, edge_config)
        passwords = make_accounts(hub_config)
        hub = subprocess.Popen(
            [str(BIN / "central-hub"), "serve", "--config", str(hub_config)],
            stderr=open(DEMO_DIR / "hub.log", "a"),  # noqa: SIM115 - lives as long as the child
            text=True,
        )
        procs.append(hub)
        wait_http(f"{hub_url}/healthz", hub)
        edge = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(edge_config)],
            stderr=open(DEMO_DIR / "edge-agent.log", "a"),  # noqa: SIM115 - lives as long as the child
            text=True,
        )
        procs.append(edge)
        print(
            f"demo: edge agent recording the cameras into {DEMO_DIR / 'edge' / 'data'} "
            f"(log {DEMO_DIR / 'edge-agent.log'})",
            flush=True,
        )
        print(f"demo: edge status:     .venv/bin/edge-agent status --config {edge_config}")
        print(f"demo: verify footage:  .venv/bin/edge-agent verify --config {edge_config}")
        print(f"demo: inject a fault:  .venv/bin/camera-sim fault cam-02 black {env_hint}")
        print(f"demo: list cameras:    .venv/bin/camera-sim list {env_hint}")
        print(
            f"demo: central hub (NOC board, API, accounts) at {hub_url}/board "
            f"(log {DEMO_DIR / 'hub.log'})"
        )
        print(f"demo:   NOC operator  {NOC_EMAIL} / {passwords[NOC_EMAIL]}")
        print(
            f"demo:   superadmin    {ADMIN_EMAIL} / {passwords[ADMIN_EMAIL]} "
            "(sets up TOTP at the first login)"
        )
        print(f"demo:   API document  {hub_url}/api/openapi.json; metrics {hub_url}/metrics")
        print(f"demo:   config        {hub_config}", flush=True)
        print("demo: running; Ctrl-C stops everything.", flush=True)
        while not stopping:
            for p in procs:
                if p.poll() is not None:
                    print(f"demo: {p.args!r} exited with {p.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)  # supervising child processes; no event source to wait on
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        print("demo: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())
