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


def test_each_rule_sits_beside_its_field_and_validate_checks_it():
    import dataclasses

    from reptok.config import TrainConfig, check_rules

    rule = {f.name: f.metadata.get("rule") for f in dataclasses.fields(TrainConfig)}
    ok, allowed = rule["cooldown"]
    assert ok(1.0) and ok(0.0) and not ok(1.5) and "[0, 1]" in allowed  # closed at 1, unlike ema's [0, 1)
    assert not rule["ema"][0](1.0)
    cfg = get_preset("tiny")
    cfg.train.token_lr_scale = 0.0
    with pytest.raises(ConfigError, match=r"train.token_lr_scale=0.0: must be > 0") as e:
        cfg.validate()
    assert e.value.key == "train.token_lr_scale"  # the CLI names its option from the key
    check_rules(cfg, keys={"train.steps"})  # only the keys asked for
    cfg.decoder.patch_size = 0  # refused by its rule, not a ZeroDivisionError in the cross-field checks
    with pytest.raises(ConfigError, match="decoder.patch_size=0"):
        cfg.validate()


def test_types_come_from_the_annotations():
    cfg = get_preset("tiny").replace(**{"vae.subfolder": "none", "encoder.mean": "0.5,0.5,0.5", "train.lr": 1,
                                        "generator.text_encoder": "null"})
    assert cfg.vae.subfolder is None and cfg.generator.text_encoder is None  # Optional[str]: "none" is None
    assert cfg.encoder.mean == [0.5, 0.5, 0.5] and isinstance(cfg.train.lr, float)
    d = get_preset("tiny").to_dict()
    d["train"]["steps"] = "4"  # a JSON file's strings are not parsed
    with pytest.raises(ConfigError, match="train.steps='4': expected int"):
        PipelineConfig.from_dict(d)
    d["train"]["steps"], d["train"]["betas"] = 4.0, [0.8, 0.9]
    cfg = PipelineConfig.from_dict(d)
    assert cfg.train.steps == 4 and isinstance(cfg.train.steps, int) and cfg.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="expected an integer"):
        get_preset("tiny").replace(**{"train.steps": 2.5})


def test_with_encoder_takes_the_width_from_the_models_layer():
    from reptok.config import with_encoder
    from reptok.models.encoder import vit_width

    assert vit_width("vit_small_patch16_224") == 384  # timm's ViT-S width, measured on the meta device
    with pytest.raises(ConfigError, match="not a timm model"):
        vit_width("vit_nonsense")
    cfg = with_encoder(get_preset("tiny"), "vit_small_patch16_224", dim=384)
    assert (cfg.encoder.dim, cfg.decoder.token_dim, cfg.generator.token_dim, cfg.encoder.img_size) == (384, 384, 384, 224)
    assert cfg.encoder.overrides == {} and cfg.encoder.weights == "hub"  # tiny's "random" becomes the hub weights


def test_train_recon_encoder_swap_measures_the_new_vit(tmp_path):
    from reptok.train.start import recon_run_config

    cfg = recon_run_config(tmp_path / "run", {}, preset="tiny", encoder="vit_small_patch16_224")
    assert (cfg.encoder.model, cfg.encoder.dim, cfg.decoder.token_dim) == ("vit_small_patch16_224", 384, 384)
    same = recon_run_config(tmp_path / "run", {}, preset="tiny", encoder=get_preset("tiny").encoder.model)
    assert same.encoder == get_preset("tiny").encoder  # the preset's own ViT: its overrides are kept
    with pytest.raises(ConfigError, match="--encoder 'vit_nonsense': not a timm model"):
        recon_run_config(tmp_path / "run", {}, preset="tiny", encoder="vit_nonsense")
