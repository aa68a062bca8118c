"""`proco-ray storage`: start, stop or inspect the local S3 server (SeaweedFS)."""

from __future__ import annotations

import argparse
import sys

from proco_ray.errors import StorageError
from proco_ray.storage.seaweedfs import DEFAULT_BUCKET, DEFAULT_DIR, DEFAULT_PORT, LocalS3Server, S3Endpoint


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
