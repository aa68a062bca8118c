"""A non-editable install (a wheel, as `pip install .` builds) carries the shipped configs and experiments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_finds_the_shipped_configs_and_experiments(tmp_path):
    """Issue 26.3: with configs/ outside the package, a wheel could not find `--config cpu-small`."""
    source = tmp_path / "source"  # build from a copy: setuptools writes build/ and egg-info beside the sources
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(source)], check=True)
    (wheel,) = (tmp_path / "wheels").glob("proco_ray-*.whl")
    target = tmp_path / "installed"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "RAY_ADDRESS": "local"}

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)

    probe = python(
        "-c",
        "import json, proco_ray\n"
        "from proco_ray.config import load_config, resolve_config_path\n"
        "from proco_ray.experiments.spec import load_experiment, resolve_experiment_path\n"
        "print(json.dumps({'package': proco_ray.__file__, 'config': str(resolve_config_path('cpu-small')),\n"
        "  'experiment': str(resolve_experiment_path('compare')), 'arch': load_config('isic2018').model.arch,\n"
        "  'variants': sorted(load_experiment('ablation').variants)}))",
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert all(found[key].startswith(str(target)) for key in ("package", "config", "experiment"))
    assert found["arch"] == "resnet50" and "full_proco" in found["variants"]
    train = python("-m", "proco_ray", "train", "--config", "cpu-small", "--data", str(tmp_path / "nothing"))
    assert train.returncode == 1 and train.stderr.startswith("proco-ray train: error: no manifest.json at"), train.stderr
