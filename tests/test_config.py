from pathlib import Path

import pytest

from proco_ray.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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


def test_wrong_types_and_malformed_overrides():
    with pytest.raises(ConfigError, match="method.gamma must be an integer"):
        load_config(None, ["method.gamma=abc"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["method.gamma"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")
