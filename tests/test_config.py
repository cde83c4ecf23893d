import pytest

from reptok.config import ConfigError, PipelineConfig
from reptok.presets import get_preset, list_presets


@pytest.mark.parametrize("name", list_presets())
def test_presets_roundtrip_json(name):
    cfg = get_preset(name)
    again = PipelineConfig.from_json(cfg.to_json())
    assert again == cfg


def test_unknown_key_rejected():
    d = get_preset("tiny").to_dict()
    d["decoder"]["widht"] = 3
    with pytest.raises(ConfigError, match="widht"):
        PipelineConfig.from_dict(d)


def test_dotted_override_and_validation():
    cfg = get_preset("tiny").replace(**{"decoder.depth": 3})
    assert cfg.decoder.depth == 3
    with pytest.raises(ConfigError):
        get_preset("tiny").replace(**{"decoder.nope": 1})
    with pytest.raises(ConfigError, match="input_size"):
        get_preset("tiny").replace(**{"image_size": 64}).validate()


def test_unknown_preset():
    with pytest.raises(KeyError):
        get_preset("huge")
