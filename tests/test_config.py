import json

import pytest

from convnext_backbone import VARIANTS, ConvNextConfig

TRANSFORMERS_DEFAULTS = dict(
    num_channels=3, patch_size=4, num_stages=4, hidden_sizes=[96, 192, 384, 768],
    depths=[3, 3, 9, 3], hidden_act="gelu", initializer_range=0.02, layer_norm_eps=1e-12,
    layer_scale_init_value=1e-6, drop_path_rate=0.0, image_size=224,
)


def test_defaults_match_transformers():
    cfg = ConvNextConfig()
    for name, value in TRANSFORMERS_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.out_features == ["stage4"] and cfg.out_indices == [4]
    assert cfg.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert cfg.strides == [4, 4, 8, 16, 32]
    assert cfg.channels == [96, 96, 192, 384, 768]
    assert cfg.use_grn is False and cfg.num_labels == 2


def test_defaults_equal_transformers_config_object():
    transformers = pytest.importorskip("transformers")
    ref = transformers.ConvNextConfig()
    ours = ConvNextConfig()
    for name in TRANSFORMERS_DEFAULTS:
        assert list(getattr(ref, name)) == getattr(ours, name) if isinstance(getattr(ours, name), list) \
            else getattr(ref, name) == getattr(ours, name), name
    assert list(ref.stage_names) == ours.stage_names


def test_stage_names_follow_num_stages():
    cfg = ConvNextConfig(num_stages=3, hidden_sizes=[8, 16, 32], depths=[1, 1, 1])
    assert cfg.stage_names == ["stem", "stage1", "stage2", "stage3"]
    assert cfg.out_features == ["stage3"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_from_variant(name):
    cfg = ConvNextConfig.from_variant(name, drop_path_rate=0.2)
    assert cfg.depths == VARIANTS[name]["depths"]
    assert cfg.hidden_sizes == VARIANTS[name]["hidden_sizes"]
    assert cfg.drop_path_rate == 0.2
    is_v2 = name.startswith("v2-")
    assert cfg.use_grn is is_v2
    assert cfg.layer_scale_init_value == (0.0 if is_v2 else 1e-6)


SPELLINGS = [("tiny", "tiny"), ("convnext_tiny", "tiny"), ("ConvNeXt-Small", "small"),
             ("convnext-v2-base", "v2-base"), ("v2_base", "v2-base"), ("v2base", "v2-base"),
             ("atto", "v2-atto"), ("HUGE", "v2-huge")]


@pytest.mark.parametrize("name,key", SPELLINGS)
def test_every_entry_point_reads_variant_names_alike(name, key):
    """One normalisation serves the config, the mmseg backbone and the torchvision builder."""
    from convnext_backbone.configuration import VARIANTS, variant_key
    from convnext_backbone.mmseg import _arch_args

    assert variant_key(name) == key
    assert ConvNextConfig.from_variant(name).hidden_sizes == VARIANTS[key]["hidden_sizes"]
    assert _arch_args(name) == VARIANTS[key]
    if key in ("tiny", "small"):  # the detector builder's drop-path table, small models only
        from convnext_backbone.torchvision import DETECTION_DROP_PATH, _detector_backbone

        fpn = _detector_backbone(name, None, 3, None, 256, None)
        assert fpn.body.config.hidden_sizes == VARIANTS[key]["hidden_sizes"]
        assert fpn.body.config.drop_path_rate == DETECTION_DROP_PATH[key]


def test_from_variant_aliases_and_errors():
    assert ConvNextConfig.from_variant("convnext-tiny").depths == [3, 3, 9, 3]
    assert ConvNextConfig.from_variant("v2_atto").hidden_sizes == [40, 80, 160, 320]
    with pytest.raises(ValueError, match="valid: .*'tiny'.*'v2-huge'"):
        ConvNextConfig.from_variant("gigantic")


@pytest.mark.parametrize("kwargs, message", [
    (dict(depths=[3, 3, 9]), "one entry per stage"),
    (dict(hidden_sizes=[96, 192, 384, 768, 1536]), "one entry per stage"),
    (dict(hidden_sizes=[96, 0, 384, 768]), "positive ints"),
    (dict(depths=[3, -1, 9, 3]), "positive ints"),
    (dict(depths="3393"), "list of 4 positive ints"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate.*\[0, 1\)"),
    (dict(drop_path_rate=1.0), r"drop_path_rate.*\[0, 1\)"),
    (dict(hidden_act="swish"), r"gelu.*relu.*selu.*gelu_new"),
    (dict(num_channels=0), "num_channels"),
    (dict(patch_size=-4), "patch_size"),
    (dict(num_stages=0), "num_stages"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
    (dict(layer_scale_init_value=-1.0), "layer_scale_init_value"),
    (dict(num_labels=-1), "num_labels"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), "disagrees"),
])
def test_bad_values_raise_naming_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvNextConfig(**kwargs)


@pytest.mark.parametrize("act", ["gelu", "relu", "selu", "gelu_new"])
def test_supported_activations(act):
    assert ConvNextConfig(hidden_act=act).hidden_act == act


def test_dict_and_json_round_trip(tmp_path):
    cfg = ConvNextConfig.from_variant("v2-nano", out_features=["stage2", "stage4"], num_labels=5,
                                      drop_path_rate=0.1)
    again = ConvNextConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.out_indices == [2, 4] and again.num_labels == 5
    path = cfg.save_pretrained(tmp_path)
    assert json.loads(open(path).read())["model_type"] == "convnextv2"
    assert ConvNextConfig.from_pretrained(tmp_path) == cfg
    # Overrides of one of the pair replace the stored pair.
    assert ConvNextConfig.from_pretrained(tmp_path, out_indices=[1]).out_features == ["stage1"]


def test_from_dict_reads_transformers_private_backbone_fields():
    # Some transformers versions store the backbone fields only privately; other private
    # keys are bookkeeping and are dropped.
    stored = dict(ConvNextConfig().to_dict(), _out_features=["stage2", "stage4"],
                  _name_or_path="somewhere", _commit_hash="abc")
    stored.pop("out_features", None)
    stored.pop("out_indices", None)
    cfg = ConvNextConfig.from_dict(stored)
    assert cfg.out_features == ["stage2", "stage4"]
    assert not any(k.startswith("_") for k in cfg.to_dict())


def test_model_output_key_and_attribute_stay_in_step():
    import torch

    from convnext_backbone.outputs import BackboneOutput

    out = BackboneOutput(feature_maps=(torch.zeros(1),))
    new = (torch.ones(1),)
    out["feature_maps"] = new
    assert out.feature_maps is new and out[0] is new
    out.feature_maps = (torch.zeros(2),)
    assert out["feature_maps"] is out.feature_maps


@pytest.mark.parametrize("variant", ["tiny", "v2-atto"])
def test_config_json_is_readable_by_transformers(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    cfg = ConvNextConfig.from_variant(variant, out_features=["stage1", "stage3"], num_labels=3)
    cfg.save_pretrained(tmp_path)
    ref_cls = transformers.ConvNextV2Config if cfg.use_grn else transformers.ConvNextConfig
    ref = ref_cls.from_pretrained(str(tmp_path))
    assert list(ref.hidden_sizes) == cfg.hidden_sizes
    assert list(ref.depths) == cfg.depths
    assert list(ref.out_features) == cfg.out_features
    assert ref.num_labels == 3
    # ...and we read transformers' own config.json back.
    ref.save_pretrained(str(tmp_path / "hf"))
    back = ConvNextConfig.from_pretrained(tmp_path / "hf")
    assert back.hidden_sizes == cfg.hidden_sizes and back.use_grn == cfg.use_grn
    assert back.out_features == cfg.out_features and back.num_labels == 3
