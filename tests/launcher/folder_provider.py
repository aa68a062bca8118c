"""A Ray cluster-launcher node provider whose nodes are folders on this machine: the local stand-in for a cloud.

`ray up`, `ray submit`, `ray exec`, `ray down` and the head's autoscaler are separate processes; they agree on
the cluster through a JSON state file (locked while read and written). Every command of a node runs as
`bash -c` in a mount namespace of its own in which the node's folder is bind-mounted at `node_home`
(/home/ray, the rayproject images' home), so each node sees the layout a real node has, and file mounts and
`ray submit`'s script land where they would on the cloud. Copies honour `rsync_exclude` as rsync does for the
patterns cluster.yaml uses; `rsync_filter` (per-directory merge files) is refused rather than ignored.

Provider keys: `module: folder_provider.FolderNodeProvider`, `state_path`, `nodes_dir`, `node_home`,
`node_ip` (default 127.0.0.1), `environment` (variables every node's commands get, like an image's ENV).
Run it only inside namespaces made for a test: its start commands run `ray stop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import click
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import TAG_RAY_NODE_KIND

# What a fresh login on a node inherits from the machine: nothing else of the caller's environment leaks in.
INHERITED = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")


def rsync_regex(pattern: str) -> re.Pattern[str]:
    """An rsync wildcard as a regex: '**' spans directories, '*' and '?' stay inside one."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcard = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcard.get(part, re.escape(part)) for part in parts))


def excluded(relative: str, patterns: list[str]) -> bool:
    """rsync's --exclude: a pattern without '/' or '**' matches the last component at any depth; any other
    matches the path's end on a component boundary ('**/x' matching 'x' at the top too), or its start if it
    begins with '/'."""
    parts = relative.split("/")
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if "/" not in pattern and "**" not in pattern:
            if rsync_regex(pattern).fullmatch(parts[-1]):
                return True
            continue
        anchored = pattern.startswith("/")
        regexes = [rsync_regex(pattern.lstrip("/"))]
        if pattern.startswith("**/"):
            regexes.append(rsync_regex(pattern[3:]))
        tails = ["/".join(parts)] if anchored else ["/".join(parts[start:]) for start in range(len(parts))]
        if any(regex.fullmatch(tail) for regex in regexes for tail in tails):
            return True
    return False


def copy_honouring_excludes(source: Path, target: Path, patterns: list[str]) -> None:
    """rsync -a SOURCE/ TARGET/ (or a single file onto TARGET) without the excluded paths."""
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return
    for folder, dirs, files in os.walk(source):
        relative_folder = Path(folder).relative_to(source)
        keep = []
        for name in dirs:
            relative = (relative_folder / name).as_posix()
            if not excluded(relative, patterns):
                keep.append(name)
        dirs[:] = keep
        (target / relative_folder).mkdir(parents=True, exist_ok=True)
        for name in files:
            relative = (relative_folder / name).as_posix()
            if not excluded(relative, patterns):
                shutil.copy2(Path(folder) / name, target / relative_folder / name, follow_symlinks=False)


class FolderCommandRunner(CommandRunnerInterface):
    """Runs a node's commands with `bash -c`, its folder mounted at its home, in the caller's pid/net namespaces."""

    def __init__(self, folder: Path, node_home: str, environment: dict[str, str]) -> None:
        self.folder = folder
        self.node_home = node_home
        self.environment = environment

    def _env(self) -> dict[str, str]:
        env = {key: os.environ[key] for key in INHERITED if key in os.environ}
        return {**env, **self.environment, "HOME": self.node_home, "USER": "ray"}

    def _command(self, cmd: str) -> list[str]:
        mount = f"mount --bind {shlex.quote(str(self.folder))} {shlex.quote(self.node_home)}"
        inner = f"{mount} && cd {shlex.quote(self.node_home)} && exec bash -c {shlex.quote(cmd)}"
        return ["unshare", "--mount", "--propagation", "private", "bash", "-c", inner]

    def run(
        self,
        cmd: str | None = None,
        timeout: int = 120,
        exit_on_fail: bool = False,
        port_forward: Any = None,
        with_output: bool = False,
        environment_variables: dict[str, object] | None = None,
        run_env: str = "auto",
        ssh_options_override_ssh_key: str = "",
        shutdown_after_run: bool = False,
    ) -> Any:
        from ray.autoscaler._private.command_runner import _with_environment_variables
        from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError

        if not cmd:
            return b"" if with_output else ""
        if environment_variables:
            cmd = _with_environment_variables(cmd, environment_variables)
        final = self._command(cmd)
        done = subprocess.run(final, env=self._env(), stdout=subprocess.PIPE if with_output else None)
        if done.returncode:
            if exit_on_fail:
                raise click.ClickException(f"Command failed:\n\n  {cmd}\n")
            raise ProcessRunnerError("Command failed", "ssh_command_failed", code=done.returncode, command=cmd)
        return done.stdout if with_output else ""

    def _on_node(self, remote: str) -> Path:
        """Where a node's path lies on this machine: its home is its folder, anything else is shared."""
        remote = self.node_home + remote[1:] if remote.startswith("~") else remote
        if remote == self.node_home or remote.startswith(self.node_home.rstrip("/") + "/"):
            return self.folder / os.path.relpath(remote, self.node_home)
        return Path(remote)

    def _check(self, options: dict[str, Any] | None) -> list[str]:
        options = options or {}
        if options.get("rsync_filter"):
            raise NotImplementedError("folder_provider copies honour rsync_exclude only, not rsync_filter")
        return list(options.get("rsync_exclude") or [])

    def run_rsync_up(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        copy_honouring_excludes(Path(source), self._on_node(target), self._check(options))

    def run_rsync_down(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        copy_honouring_excludes(self._on_node(source), Path(target), self._check(options))

    def remote_shell_command_str(self) -> str:
        return shlex.join(self._command("bash -l")) + "\n"


class FolderNodeProvider(NodeProvider):
    """Nodes as folders under `nodes_dir`, their records in `state_path`."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.state_path = Path(provider_config["state_path"])
        self.nodes_dir = Path(provider_config["nodes_dir"])
        self.node_home = provider_config.get("node_home", "/home/ray")
        self.node_ip = provider_config.get("node_ip", "127.0.0.1")
        self.environment = {key: str(value) for key, value in provider_config.get("environment", {}).items()}

    @contextlib.contextmanager
    def _state(self):
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state_path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"nodes": {}}
            yield state
            self.state_path.write_text(json.dumps(state, indent=1))

    def _nodes(self) -> dict[str, dict[str, Any]]:
        with self._state() as state:
            return state["nodes"]

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        return [
            node_id
            for node_id, node in self._nodes().items()
            if node["cluster"] == self.cluster_name and all(node["tags"].get(k) == v for k, v in tag_filters.items())
        ]

    def is_running(self, node_id: str) -> bool:
        return node_id in self._nodes()

    def is_terminated(self, node_id: str) -> bool:
        return node_id not in self._nodes()

    def node_tags(self, node_id: str) -> dict[str, str]:
        return dict(self._nodes()[node_id]["tags"])

    def external_ip(self, node_id: str) -> str:
        return self.node_ip

    def internal_ip(self, node_id: str) -> str:
        return self.node_ip

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with self._state() as state:
            state["nodes"][node_id]["tags"].update(tags)

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> dict[str, Any]:
        created = {}
        with self._state() as state:
            for _ in range(count):
                node_id = f"{tags.get(TAG_RAY_NODE_KIND, 'node')}-{uuid.uuid4().hex[:8]}"
                folder = self.nodes_dir / node_id
                folder.mkdir(parents=True)
                state["nodes"][node_id] = {"cluster": self.cluster_name, "tags": dict(tags), "folder": str(folder)}
                created[node_id] = state["nodes"][node_id]
        return created

    def terminate_node(self, node_id: str) -> None:
        """A terminated machine loses its disk: the folder goes with the record."""
        with self._state() as state:
            node = state["nodes"].pop(node_id, None)
        if node is not None:
            shutil.rmtree(node["folder"], ignore_errors=True)

    def get_command_runner(
        self,
        log_prefix: str,
        node_id: str,
        auth_config: dict[str, Any],
        cluster_name: str,
        process_runner: Any,
        use_internal_ip: bool,
        docker_config: dict[str, Any] | None = None,
    ) -> CommandRunnerInterface:
        return FolderCommandRunner(Path(self._nodes()[node_id]["folder"]), self.node_home, self.environment)
