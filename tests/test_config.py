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


def test_lr_schedule_warmup_constant_cooldown():
    from reptok.config import TrainConfig
    from reptok.train.loop import _lr_at

    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, cooldown=0.2)
    lrs = [_lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[79] == 1.0
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and 0 < lrs[99] <= 0.05
    assert _lr_at(TrainConfig(steps=100, lr=1.0), 99) == 1.0  # default: constant, as the paper
    bad = get_preset("tiny")
    bad.train.cooldown = 1.5
    with pytest.raises(ConfigError, match="cooldown"):
        bad.validate()


@pytest.mark.parametrize("key, value, match", [
    ("train.ckpt_every", 0, "train.ckpt_every=0"),      # fit() would divide by zero at step 1
    ("train.log_every", 0, "train.log_every=0"),
    ("train.grad_accum", 3, "not divisible by train.grad_accum=3"),  # batch 8: fit() refused it after loading
])
def test_values_that_fail_only_later_are_refused_up_front(key, value, match):
    cfg = get_preset("tiny").replace(**{key: value, "train.batch_size": 8})
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    get_preset("tiny").replace(**{"train.ckpt_every": 1, "train.grad_accum": 4, "train.batch_size": 8}).validate()
