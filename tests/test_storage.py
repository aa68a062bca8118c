"""Object storage: AWS settings, URI resolution, and the embedded SeaweedFS server (a real S3, never mocked)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from proco_ray.errors import StorageError
from proco_ray.storage.s3 import S3Settings, aws_settings, ensure_bucket, resolve, s3_filesystem, storage_errors
from proco_ray.storage.seaweedfs import LocalS3Server, free_port


def test_aws_settings_from_variables_win_over_files(tmp_path):
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text("[default]\naws_access_key_id = filekey\naws_secret_access_key = filesecret\n")
    (aws / "config").write_text("[default]\nregion = eu-west-3\nendpoint_url = http://files:9000\n")
    from_files = aws_settings({}, home=tmp_path)
    assert from_files == S3Settings("http://files:9000", "filekey", "filesecret", None, "eu-west-3")
    env = {"AWS_ENDPOINT_URL": "http://env:1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "r"}
    assert aws_settings(env, home=tmp_path) == S3Settings("http://env:1", "k", "s", None, "r")
    assert aws_settings({**env, "AWS_ENDPOINT_URL_S3": "http://s3only:2"}, home=tmp_path).endpoint == "http://s3only:2"


def test_aws_settings_named_profile(tmp_path):
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "config").write_text("[profile lab]\nregion = us-west-2\naws_access_key_id = a\naws_secret_access_key = b\n")
    settings = aws_settings({"AWS_PROFILE": "lab"}, home=tmp_path)
    assert (settings.region, settings.access_key, settings.secret_key) == ("us-west-2", "a", "b")
    assert aws_settings({}, home=tmp_path).region == "us-east-1"


def test_resolve_local_and_s3(tmp_path):
    fs, path = resolve(str(tmp_path / "x"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    fs, path = resolve("s3://bucket/some/prefix/", S3Settings("http://127.0.0.1:1", "a", "b"))
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    with pytest.raises(StorageError, match="names no bucket"):
        resolve("s3://")


def test_server_serves_s3_with_credentials(s3_server):
    fs = s3_server.filesystem()
    ensure_bucket(fs, "fresh-bucket/a/b")
    with fs.open_output_stream("fresh-bucket/a/b/hello.txt") as out:
        out.write(b"hello")
    with fs.open_input_stream("fresh-bucket/a/b/hello.txt") as stream:
        assert stream.read() == b"hello"
    assert s3_server.endpoint.startswith("http://127.0.0.1:")


def test_wrong_credentials_fail_within_seconds(s3_server):
    settings = S3Settings(s3_server.endpoint, s3_server.access_key, "not-the-secret")
    fs = s3_filesystem(settings)
    started = time.monotonic()
    with pytest.raises(StorageError, match="access denied"), storage_errors("s3://proco/x"):
        fs.get_file_info("proco/x")
    assert time.monotonic() - started < 10


def test_unreachable_endpoint_fails_within_seconds():
    fs = s3_filesystem(S3Settings(f"http://127.0.0.1:{free_port()}", "a", "b"))
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot connect"), storage_errors("s3://proco/x"):
        fs.get_file_info("proco/x")
    assert time.monotonic() - started < 10


def test_start_refuses_a_port_in_use(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(StorageError, match=f"port {port} .* in use"):
            LocalS3Server(tmp_path / "s3", port=port).start()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proco_ray", "storage", *args], capture_output=True, text=True, timeout=120)


def test_cli_start_status_env_stop_across_processes(tmp_path):
    """start in one process, status/env/stop from others (the pid file), data kept across a restart."""
    data_dir = str(tmp_path / "storage")
    port = str(free_port())
    try:
        started = _cli("start", "--dir", data_dir, "--port", port)
        assert started.returncode == 0, started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout
        assert _cli("status", "--dir", data_dir, "--port", port).returncode == 0
        env = _cli("env", "--dir", data_dir, "--port", port).stdout
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in env
        assert "export AWS_SECRET_ACCESS_KEY=" in env
        server = LocalS3Server(data_dir, int(port))
        assert server.running()
        with server.endpoint().filesystem().open_output_stream("proco/kept.txt") as out:
            out.write(b"kept")
    finally:
        stopped = _cli("stop", "--dir", data_dir, "--port", port)
    assert stopped.stdout.strip() == "stopped"
    assert _cli("status", "--dir", data_dir, "--port", port).returncode == 3
    with LocalS3Server(data_dir, int(port)) as endpoint:
        with endpoint.filesystem().open_input_stream("proco/kept.txt") as stream:
            assert stream.read() == b"kept"


def test_local_server_is_private_to_its_owner(tmp_path):
    """SeaweedFS's own HTTP APIs refuse unsigned requests; the data directory and its files are the owner's only."""
    import json
    import urllib.error
    import urllib.request

    server = LocalS3Server(tmp_path / "private")
    with server as endpoint:
        with endpoint.filesystem().open_output_stream("proco/secret/a.txt") as out:
            out.write(b"secret")
        ports = json.loads(server.state_file.read_text())["ports"]
        filer = f"http://127.0.0.1:{ports['filer.port']}"
        attempts = [
            urllib.request.Request(f"{filer}/buckets/proco/secret/"),
            urllib.request.Request(f"{filer}/buckets/proco/secret/a.txt"),
            urllib.request.Request(f"{filer}/buckets/proco/evil.txt", data=b"x", method="PUT"),
        ]
        assign = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports['master.port']}/dir/assign", timeout=5).read())
        attempts.append(urllib.request.Request(f"http://{assign['url']}/{assign['fid']}", data=b"x", method="POST"))
        for request in attempts:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5)
            assert refused.value.code == 401, (request.full_url, refused.value.code)
        assert_grpc_takes_only_mutual_tls(tmp_path / "private", ports)
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
        for name in (
            "s3.json",
            "server.json",
            "security.toml",
            "server.log",
            "server.pid",
            "grpc-ca.crt",
            "grpc.crt",
            "grpc.key",
        ):
            assert (tmp_path / "private" / name).stat().st_mode & 0o777 == 0o600, name
        data_files = [p for p in (tmp_path / "private" / "weed").rglob("*") if p.suffix in (".dat", ".idx")]
        assert data_files and all(p.stat().st_mode & 0o077 == 0 for p in data_files)


def assert_grpc_takes_only_mutual_tls(data_dir: Path, ports: dict[str, int]) -> None:
    """SeaweedFS's gRPC ports (file metadata, volume assignment) refuse plain and one-sided TLS
    connections; only a client with the certificate in the owner's data directory gets an answer."""
    import grpc

    ca, cert, key = ((data_dir / name).read_bytes() for name in ("grpc-ca.crt", "grpc.crt", "grpc.key"))
    calls = {
        "master.port.grpc": "/master_pb.Seaweed/GetMasterConfiguration",
        "filer.port.grpc": "/filer_pb.SeaweedFiler/GetFilerConfiguration",
        "volume.port.grpc": "/volume_server_pb.VolumeServer/VolumeServerStatus",
    }
    for port, method in calls.items():
        address = f"127.0.0.1:{ports[port]}"
        for refused in (grpc.insecure_channel(address), grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))):
            with refused, pytest.raises(grpc.RpcError) as error:
                refused.unary_unary(method)(b"", timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, (port, error.value)
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert)) as mutual:
            assert mutual.unary_unary(method)(b"", timeout=5), port
