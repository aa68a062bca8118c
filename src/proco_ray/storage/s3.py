"""Object storage: every URI (local path or s3://bucket/prefix) maps to one pyarrow filesystem.

S3 settings come from the usual AWS variables and files, so the same code talks
to AWS S3, MinIO or SeaweedFS (the local server of `proco_ray.storage.s3.seaweedfs`).
"""

from __future__ import annotations

import configparser
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from proco_ray.errors import DataError, StorageError

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


@dataclass(frozen=True)
class ClaimedOutput:
    """An output folder a command may write: empty, or (with --overwrite) holding an earlier output of that command.

    The command computes everything first and calls `replace_earlier` just before it writes, so a failure on
    the way leaves an earlier output as it was.
    """

    uri: str
    fs: pafs.FileSystem
    path: str
    command: str
    occupied: bool

    def replace_earlier(self, delete_first: str | None = None) -> None:
        """Delete an earlier output (`delete_first`, e.g. prepare's manifest, before the rest, so an interrupted
        clear never leaves it over a partial folder), then mark the folder as this command's own."""
        with storage_errors(self.uri):
            if self.occupied:
                if delete_first and self.fs.get_file_info(join(self.path, delete_first)).type == pafs.FileType.File:
                    self.fs.delete_file(join(self.path, delete_first))
                self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
        write_bytes(
            join(self.uri, output_marker(self.command)),
            f"written by proco-ray {self.command}; --overwrite may replace this folder\n".encode(),
        )


def output_marker(command: str) -> str:
    """The file that marks a folder as `command`'s output: --overwrite replaces only such a folder."""
    return f".proco-ray-{command}"


def claim_output(
    uri: str, overwrite: bool, command: str, describe: Callable[[set[str]], str], also_own: Sequence[str] = ()
) -> ClaimedOutput:
    """Reach an output (creating a missing bucket) and refuse one that holds files unless --overwrite and
    `command`'s marker (or a name in `also_own`, files only `command` writes) is among them, so --overwrite
    never deletes what `command` did not write. `describe(names)` says what the files are.
    """
    fs, path = resolve(uri)
    marks = [output_marker(command), *also_own]
    with storage_errors(uri):
        ensure_bucket(fs, path)
        existing = list_files(fs, path)
    claimed = ClaimedOutput(uri, fs, path, command, occupied=bool(existing))
    if not existing:
        return claimed
    names = {f.path for f in existing}
    if not overwrite:
        raise DataError(f"output {uri} already holds {describe(names)} ({len(existing)} files); pass --overwrite to replace it")
    if not any(join(path, mark) in names for mark in marks):
        raise DataError(
            f"output {uri} holds {len(existing)} file(s) that proco-ray {command} did not write (no "
            f"{' or '.join(marks)}); --overwrite only replaces a previous {command}'s "
            f"output, so choose a new or empty output"
        )
    return claimed


def is_file(uri: str) -> bool:
    """Whether a file is there (local or s3://), without reading it."""
    fs, path = resolve(uri)
    with storage_errors(uri):
        return fs.get_file_info(path).type == pafs.FileType.File


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
