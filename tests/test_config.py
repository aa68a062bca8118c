from pathlib import Path

import pytest

from proco_ray.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "proco_ray" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_overrides_are_typed_and_applied(tmp_path):
    config = load_config(CONFIGS / "cpu-small.yaml", ["method.gamma=3", "optim.lr=0.1", "model.pretrained=null"])
    assert config.method.gamma == 3 and config.optim.lr == 0.1 and config.model.pretrained is None
    assert config.model.arch == "resnet18"


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  gama: 3\n")
    with pytest.raises(ConfigError, match=r"method\.gama.*'gamma'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"optimm.*'optim'"):
        load_config(None, ["optimm.lr=1"])


def test_a_retired_key_is_dropped_from_old_configs_and_refused_when_it_would_matter():
    assert load_config(None, ["data.resample=false"]).to_dict() == load_config(None).to_dict()
    with pytest.raises(ConfigError, match="'data.resample' was removed: .*ce_resample, cl_resample, proco"):
        load_config(None, ["data.resample=true"])


def test_a_run_config_states_how_it_trains():
    """Issue 26.1: `proco` is ProCo as selected; every auto is resolved in the config a run saves."""
    from proco_ray.method.registry import resolved

    def explicit(*overrides: str, path: str | None = None) -> tuple[str, str, str]:
        config = resolved(load_config(path, list(overrides)))
        return config.method.sampling, config.method.proto_form, config.data.augmentation

    assert explicit() == ("class_balanced", "split", "supervised")
    assert explicit("method.name=proco_paper") == ("instance_balanced", "eq7", "moco_v2")
    assert explicit("method.sampling=instance_balanced") == ("instance_balanced", "split", "supervised")
    assert explicit("method.name=ce") == ("instance_balanced", "split", "supervised")
    assert explicit("method.name=cl_resample") == (
        "pretrain:instance_balanced,linear:class_balanced",
        "split",
        "pretrain:moco_v2,linear:supervised",
    )
    # the retired name keeps its meaning of the time: class-balanced, Eq. 7, MoCo v2's views, unless set
    assert explicit("method.name=proco_resample") == ("class_balanced", "eq7", "moco_v2")
    assert explicit("method.name=proco_resample", "method.proto_form=split", "data.augmentation=supervised") == explicit()
    with pytest.raises(ConfigError, match="method 'ce' trains on instance_balanced batches"):
        resolved(load_config(None, ["method.name=ce", "method.sampling=class_balanced"]))
    with pytest.raises(ConfigError, match="method.name must be one of"):
        resolved(load_config(None, ["method.name=proco_v2"]))
    for name in ("cpu-small", "cpu-32px", "gpu-64px", "isic2018", "aptos2019"):
        assert load_config(name).method.name == "proco" and explicit(path=name) == explicit()


def test_a_resolved_config_reloads_as_the_same_run(tmp_path):
    from proco_ray.config import save_config
    from proco_ray.method.registry import resolved

    for name in ("proco", "proco_paper", "cl_resample", "ce"):
        config = resolved(load_config(None, [f"method.name={name}"]))
        save_config(config, tmp_path / "config.yaml")
        text = (tmp_path / "config.yaml").read_text()
        assert ": auto" not in text
        assert resolved(load_config(tmp_path / "config.yaml")) == config


def test_wrong_types_and_malformed_overrides():
    with pytest.raises(ConfigError, match="method.gamma must be an integer"):
        load_config(None, ["method.gamma=abc"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["method.gamma"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")


def test_cli_prints_one_line_for_expected_errors_before_starting_ray(tmp_path):
    """Issue 11.7: a bad config key or data URI gave a 15-46 line traceback after Ray had started."""
    import os
    import subprocess
    import sys

    def train(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "RAY_ADDRESS": "local"}
        return subprocess.run(
            [sys.executable, "-m", "proco_ray", "train", "--config", "cpu-small", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    bad_key = train("--data", str(tmp_path / "nothing"), "optim.epohcs=3")
    assert bad_key.returncode == 1
    assert bad_key.stderr.startswith("proco-ray train: error: unknown config key 'optim.epohcs'; did you mean 'epochs'?")
    no_data = train("--data", str(tmp_path / "nothing"))
    assert no_data.returncode == 1 and no_data.stderr.startswith("proco-ray train: error: no manifest.json at")
    for result in (bad_key, no_data):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert "Ray" not in result.stderr  # refused before a Ray instance was started


def test_settings_that_name_a_choice_are_checked_where_the_config_is_loaded_and_built():
    """Issue 27.4: allowed values live in config.py's Literal types; the loader and direct construction check them."""
    import dataclasses

    from proco_ray.config import DataConfig, MethodConfig, ModelConfig

    with pytest.raises(ConfigError, match=r"model.arch must be one of \['resnet18', .*got 'resnet51'; did you mean 'resnet50'"):
        load_config(None, ["model.arch=resnet51"])
    with pytest.raises(ConfigError, match="model.norm must be one of"):
        ModelConfig(norm="layer")
    with pytest.raises(ConfigError, match="method.proto_form must be one of \\['auto', 'eq7'"):
        load_config(None, ["method.proto_form=sum"])
    with pytest.raises(ConfigError, match="method.sampling must be 'auto' or one of"):
        MethodConfig(sampling="pretrain:class_balanced,linear:balanced")
    with pytest.raises(ConfigError, match="data.augmentation must be 'auto' or one of"):
        DataConfig(augmentation="randaugment")
    with pytest.raises(ConfigError, match="method.eps_max"):
        dataclasses.replace(MethodConfig(), eps_max=1.5)
    assert MethodConfig(sampling="pretrain:auto,linear:class_balanced").sampling == "pretrain:auto,linear:class_balanced"


def test_the_names_a_config_may_give_are_the_registered_methods_and_the_augmentations():
    import typing

    from proco_ray.config import Augmentation, MethodName
    from proco_ray.data.augment import RECIPES
    from proco_ray.method.registry import METHODS

    assert set(typing.get_args(MethodName)) == set(METHODS)
    assert set(typing.get_args(Augmentation)) == {*RECIPES, "none"}
