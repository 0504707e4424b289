"""Checkpoint formats: detection, conversion round trips, safe loading, from_pretrained /
save_pretrained, strict and non-strict loading, and the convert tool."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch

from convnext_backbone import (ConvNextBackbone, ConvNextConfig, ConvNextForImageClassification,
                               ConvNextModel)
from convnext_backbone import checkpoints as ck
from convnext_backbone.checkpoints import (FORMATS, CheckpointMismatchError, UnsafeCheckpointError,
                                           canonical_state_dict, convert_state_dict, detect_format,
                                           from_canonical, infer_config, load_checkpoint, load_into,
                                           to_canonical)
from convnext_backbone.cli import convert_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES, DEPTHS = [8, 16, 32, 64], [1, 1, 2, 1]
ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.5 if ("grn" in name or "gamma" in name) else
                    noise * 0.05 if p.dim() >= 2 else p + noise * 0.1)
    return module.eval()


def _config(v2: bool = False, **kw) -> ConvNextConfig:
    args = dict(hidden_sizes=SIZES, depths=DEPTHS)
    if v2:
        args.update(use_grn=True, layer_scale_init_value=0.0)
    args.update(kw)
    return ConvNextConfig(**args)


def _classifier(v2: bool = False, num_labels: int = 5) -> ConvNextForImageClassification:
    return _randomise(ConvNextForImageClassification(_config(v2, num_labels=num_labels)))


def _backbone(v2: bool = False, out_features=ALL_STAGES) -> ConvNextBackbone:
    return _randomise(ConvNextBackbone(_config(v2, out_features=out_features)), seed=1)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b), (sorted(set(a) ^ set(b)))[:10]
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# --- conversion: round trips and key layouts ------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_round_trip_classifier_layout(fmt: str, v2: bool) -> None:
    canonical = canonical_state_dict(_classifier(v2))
    assert "norm.weight" in canonical and "head.weight" in canonical
    if fmt == "torchvision" and v2:
        # torchvision has no ConvNeXt V2: GRN cannot be written, and it says so.
        with pytest.raises(ValueError, match="no place for .*grn"):
            from_canonical(canonical, fmt)
        return
    converted = from_canonical(canonical, fmt)
    assert detect_format(converted) == fmt
    back, report = to_canonical(converted)
    assert report.src_format == fmt and not report.unrecognised and not report.ignored
    _same(canonical, back)


@pytest.mark.parametrize("fmt", ["official", "mmpretrain", "transformers"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_round_trip_backbone_with_out_norms(fmt: str, v2: bool) -> None:
    canonical = canonical_state_dict(_backbone(v2))
    assert "norm_stem.weight" in canonical and "norm3.weight" in canonical
    back, _ = to_canonical(from_canonical(canonical, fmt))
    _same(canonical, back)


@pytest.mark.parametrize("fmt", ["timm", "torchvision"])
def test_formats_without_out_norms_refuse_or_drop_them(fmt: str) -> None:
    canonical = canonical_state_dict(_backbone())
    with pytest.raises(ValueError, match="drop_unsupported=True"):
        from_canonical(canonical, fmt)
    out = from_canonical(canonical, fmt, drop_unsupported=True)
    back, _ = to_canonical(out)
    dropped = {f"{n}.{t}" for n in ("norm_stem", "norm0", "norm1", "norm2", "norm3")
               for t in ("weight", "bias")}
    assert set(canonical) - set(back) == dropped
    _same({k: v for k, v in canonical.items() if k not in dropped}, back)


def test_expected_keys_and_shapes_per_format() -> None:
    """Spot checks of ANCHORS.md §2: names and tensor shapes in each layout."""
    canonical = canonical_state_dict(_classifier(v2=True))
    four_c = 4 * SIZES[0]
    official = from_canonical(canonical, "official")
    assert official["stages.0.0.grn.gamma"].shape == (1, 1, 1, four_c)
    assert "head.weight" in official and "norm.weight" in official
    mm = from_canonical(canonical, "mmpretrain")
    assert mm["backbone.stages.0.0.grn.gamma"].shape == (four_c,)
    assert "backbone.stages.0.0.depthwise_conv.weight" in mm
    assert "backbone.stages.1.0.pointwise_conv2.bias" in mm
    assert "backbone.norm3.weight" in mm and "head.fc.weight" in mm  # pooled norm as norm3
    hf = from_canonical(canonical, "transformers")
    assert hf["convnextv2.encoder.stages.0.layers.0.grn.weight"].shape == (1, 1, 1, four_c)
    assert {"convnextv2.embeddings.patch_embeddings.weight", "convnextv2.layernorm.weight",
            "convnextv2.encoder.stages.1.downsampling_layer.1.weight", "classifier.weight"} <= set(hf)
    timm_sd = from_canonical(canonical, "timm", pointwise_as_conv=True)
    assert timm_sd["stages.0.blocks.0.mlp.grn.weight"].shape == (four_c,)
    assert timm_sd["stages.0.blocks.0.mlp.fc1.weight"].shape == (four_c, SIZES[0], 1, 1)
    assert {"stem.0.weight", "stages.1.downsample.0.weight", "head.norm.weight", "head.fc.weight"} <= set(timm_sd)
    tv = from_canonical(canonical_state_dict(_classifier(v2=False)), "torchvision")
    assert tv["features.1.0.layer_scale"].shape == (SIZES[0], 1, 1)
    assert tv["features.7.0.block.3.weight"].shape == (4 * SIZES[3], SIZES[3])
    assert {"features.0.0.weight", "features.2.1.weight", "features.6.0.weight",
            "classifier.0.weight", "classifier.2.weight"} <= set(tv)


def test_official_det_seg_checkpoint_ignores_decode_heads(tmp_path) -> None:
    backbone = _backbone(out_features=["stage1", "stage2", "stage3", "stage4"])
    sd = {"backbone." + k: v for k, v in canonical_state_dict(backbone).items()}
    extra = {"decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1),
             "decode_head.conv_seg.bias": torch.zeros(150),
             "auxiliary_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)}
    path = tmp_path / "upernet_convnext.pth"
    torch.save({"meta": {"epoch": 3, "iter": 160000}, "state_dict": {**sd, **extra}}, path)

    state = load_checkpoint(path)
    assert detect_format(state) == "official"
    canonical, report = to_canonical(state)
    assert sorted(report.ignored) == sorted(extra) and report.unrecognised == []
    assert report.prefix == "backbone."
    loaded = ConvNextBackbone.from_pretrained(path)
    assert loaded.out_features == ["stage1", "stage2", "stage3", "stage4"]  # from norm0..3
    assert sorted(loaded.load_report.ignored_keys) == sorted(extra)
    x = _x()
    with torch.no_grad():
        for a, b in zip(backbone(x).feature_maps, loaded(x).feature_maps):
            assert torch.equal(a, b)


def test_official_classification_checkpoint(tmp_path) -> None:
    classifier = _classifier()
    path = tmp_path / "convnext_tiny_1k_224.pth"
    torch.save({"model": canonical_state_dict(classifier), "epoch": 299}, path)
    loaded = ConvNextForImageClassification.from_pretrained(path)
    assert loaded.config.num_labels == 5 and loaded.config.layer_norm_eps == 1e-6
    # Same numbers as the source up to the final norm's eps (official 1e-6, ours 1e-12).
    ref = ConvNextForImageClassification(_config(num_labels=5, layer_norm_eps=1e-6)).eval()
    load_into(ref, canonical_state_dict(classifier))
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref(x).logits)


def test_mmpretrain_pooled_norm3_is_the_final_norm_not_an_out_norm() -> None:
    """mmpretrain's classifier stores its pooled norm as `backbone.norm3`
    (gap_before_final_norm); it must become `norm`, never stage4's spatial out norm."""
    model = _randomise(ConvNextModel(_config(layer_norm_eps=1e-6)))
    canonical = canonical_state_dict(model)
    canonical["head.weight"], canonical["head.bias"] = torch.randn(3, SIZES[-1]), torch.randn(3)
    mm = from_canonical(canonical, "mmpretrain")
    assert "backbone.norm3.weight" in mm and "backbone.norm.weight" not in mm
    back, _ = to_canonical(mm)
    assert "norm.weight" in back and "norm3.weight" not in back

    # A backbone asking for stage4 must not receive the pooled norm as its out norm.
    backbone = ConvNextBackbone(_config(out_features=["stage4"]))
    with pytest.raises(CheckpointMismatchError, match="norm3.weight"):
        load_into(backbone, mm, strict=True)
    report = load_into(backbone, mm, strict=False)
    assert report.missing_keys == ["norm3.weight", "norm3.bias"]
    assert set(report.ignored_keys) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}

    # Into the bare model: the pooled output is the source's.
    loaded = ConvNextModel(_config(layer_norm_eps=1e-6)).eval()
    load_into(loaded, mm)
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x).pooler_output, model(x).pooler_output)


def test_mmpretrain_det_seg_norms_are_out_norms() -> None:
    backbone = _backbone(out_features=["stage1", "stage2", "stage3", "stage4"])
    mm = from_canonical(canonical_state_dict(backbone), "mmpretrain")
    mm["decode_head.conv_seg.weight"] = torch.zeros(19, 64, 1, 1)
    assert detect_format(mm) == "mmpretrain"
    canonical, report = to_canonical(mm)
    assert {"norm0.weight", "norm3.weight"} <= set(canonical) and "norm.weight" not in canonical
    assert report.ignored == ["decode_head.conv_seg.weight"]
    assert infer_config(canonical).out_features == ["stage1", "stage2", "stage3", "stage4"]


def test_mmpretrain_1x1_conv_pointwise_weights_are_squeezed() -> None:
    canonical = canonical_state_dict(_classifier())
    mm = from_canonical(canonical, "mmpretrain", pointwise_as_conv=True)
    assert mm["backbone.stages.0.0.pointwise_conv1.weight"].dim() == 4
    back, _ = to_canonical(mm)
    _same(canonical, back)


def test_detect_format_prefixes_and_errors() -> None:
    canonical = canonical_state_dict(_classifier())
    hf_backbone = from_canonical(canonical_state_dict(_backbone()), "transformers")
    # transformers' UperNet keeps its ConvNextBackbone under `backbone.`
    upernet = {"backbone." + k: v for k, v in hf_backbone.items()}
    upernet["decode_head.classifier.weight"] = torch.zeros(3, 8, 1, 1)
    assert detect_format(upernet) == "transformers"
    back, report = to_canonical(upernet)
    assert report.prefix == "backbone." and report.ignored == ["decode_head.classifier.weight"]
    assert "norm_stem.weight" in back
    # timm features_only keys
    timm_fo = {k.replace("stem.", "stem_").replace("stages.", "stages_", 1) if k.startswith(("stem.", "stages.")) else k: v
               for k, v in from_canonical(canonical, "timm").items() if not k.startswith("head.")}
    assert "stem_0.weight" in timm_fo and detect_format(timm_fo) == "timm"
    assert to_canonical(timm_fo)[0].keys() == {k for k in canonical if not k.startswith(("head.", "norm."))}
    # Unknown layouts: the message lists the formats and some keys.
    with pytest.raises(ValueError) as err:
        detect_format({"encoder.layer.0.weight": torch.zeros(1), "foo.bias": torch.zeros(1)})
    msg = str(err.value)
    assert all(f in msg for f in FORMATS) and "encoder.layer.0.weight" in msg
    with pytest.raises(ValueError, match="valid:"):
        from_canonical(canonical, "onnx")
    with pytest.raises(ValueError, match="valid:"):
        to_canonical(canonical, "detectron2")


def test_own_module_state_dicts_convert() -> None:
    """This package's module state dicts (classifier: `convnext.*` + `classifier.*`) are
    read as the official layout, head included."""
    classifier = _classifier()
    canonical, report = to_canonical(classifier.state_dict())
    assert report.src_format == "official" and not report.ignored and not report.unrecognised
    _same(canonical, canonical_state_dict(classifier))
    backbone = _backbone(v2=True)
    _same(to_canonical(backbone.state_dict())[0], canonical_state_dict(backbone))


def test_convert_state_dict_between_formats() -> None:
    canonical = canonical_state_dict(_classifier())
    tv = from_canonical(canonical, "torchvision")
    timm_sd = convert_state_dict(tv, "timm")
    assert set(timm_sd) == set(from_canonical(canonical, "timm"))
    _same(to_canonical(timm_sd)[0], canonical)
    # An explicit, wrong src_format maps nothing and says so.
    with pytest.raises(ValueError, match="No tensor"):
        convert_state_dict(tv, "timm", src_format="transformers")


# --- architecture inference ---------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_infer_config_from_every_format(fmt: str) -> None:
    v2 = fmt != "torchvision"
    source = _classifier(v2=v2, num_labels=11)
    sd = from_canonical(canonical_state_dict(source), fmt)
    cfg = infer_config(to_canonical(sd)[0])
    assert cfg.depths == DEPTHS and cfg.hidden_sizes == SIZES and cfg.num_labels == 11
    assert cfg.use_grn is v2 and (cfg.layer_scale_init_value > 0) is (not v2)
    assert (cfg.patch_size, cfg.num_channels) == (4, 3)
    assert cfg.out_features == ["stage4"]  # no out norms: the default


def test_infer_config_variants_and_out_norms() -> None:
    cfg = infer_config(canonical_state_dict(ConvNextBackbone(ConvNextConfig.from_variant(
        "v2-atto", out_features=["stem", "stage2"]))))
    assert (cfg.depths, cfg.hidden_sizes, cfg.use_grn) == ([2, 2, 6, 2], [40, 80, 160, 320], True)
    assert cfg.out_features == ["stem", "stage2"]
    cfg = infer_config(canonical_state_dict(ConvNextModel(_config(patch_size=2, num_channels=1))),
                       out_indices=[1, 2], drop_path_rate=0.1)
    assert (cfg.patch_size, cfg.num_channels, cfg.out_indices, cfg.drop_path_rate) == (2, 1, [1, 2], 0.1)
    with pytest.raises(ValueError, match="stem conv"):
        infer_config({"stages.0.0.dwconv.weight": torch.zeros(8, 1, 7, 7)})


# --- load_checkpoint --------------------------------------------------------------------
def test_load_checkpoint_wrappers_and_prefixes(tmp_path) -> None:
    sd = canonical_state_dict(_classifier())
    cases = {
        "plain.pth": sd,
        "model.pth": {"model": sd, "optimizer": {"state": {}}, "epoch": 3},
        "state_dict.pth": {"state_dict": sd, "meta": {"iter": 10}},
        "module.pth": {"module": sd},
        "ema.pth": {"model_ema": sd, "epoch": 1},
        "ddp.pth": {"module." + k: v for k, v in sd.items()},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        _same(load_checkpoint(tmp_path / name), sd)
    # 'model_ema' is only used when there is no 'model'.
    other = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": sd, "model_ema": other}, tmp_path / "both.pth")
    _same(load_checkpoint(tmp_path / "both.pth"), sd)
    ck.save_state_dict(sd, tmp_path / "w.safetensors")
    _same(load_checkpoint(tmp_path / "w.safetensors"), sd)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="No tensors"):
        load_checkpoint(tmp_path / "empty.pth")


class _Payload:
    """Unpickling this would create a marker file (code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"stem.0.weight": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    assert "weights_only" in str(err.value) and "safetensors" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnsafeCheckpointError):
        ConvNextBackbone.from_pretrained(path)
    with pytest.raises(SystemExit, match="Refusing"):
        convert_main([str(path), str(tmp_path / "out.safetensors"), "--to", "timm", "--no-progress"])
    assert not marker.exists()


class _GetattrGadget:
    """Pickles as `getattr(numpy.ndarray, 'tofile')`: a function reached through getattr."""

    def __reduce__(self):
        import numpy
        return (getattr, (numpy.ndarray, "tofile"))


def test_numpy_metadata_is_accepted_code_is_not(tmp_path) -> None:
    """Training frameworks store numpy scalars/arrays in `meta`: data only, accepted.
    A function reached through `builtins.getattr` is refused, also once mmengine's
    checkpoints are allow-listed (that allows only HistoryBuffer's statistics)."""
    np = pytest.importorskip("numpy")
    sd = canonical_state_dict(_classifier())
    torch.save({"meta": {"seed": np.int64(3), "lr": np.float64(1e-4), "hist": np.arange(4.0)},
                "state_dict": sd}, tmp_path / "np_meta.pth")
    _same(load_checkpoint(tmp_path / "np_meta.pth"), sd)
    torch.save({"meta": {"x": _GetattrGadget()}, "state_dict": sd}, tmp_path / "gadget.pth")
    # Refused as an unknown global, or (once an earlier test set up mmengine's allow-list)
    # by the restricted getattr that stands in for it.
    refused = r"builtins.getattr|getattr\('numpy.ndarray', 'tofile'\)"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        load_checkpoint(tmp_path / "gadget.pth")

    mmengine_logging = pytest.importorskip("mmengine.logging")
    from convnext_backbone.mmengine_utils import setup_mmengine

    setup_mmengine()
    buffer = mmengine_logging.HistoryBuffer()
    buffer.update(0.5)
    torch.save({"meta": {"message_hub": {"loss": buffer}}, "state_dict": sd}, tmp_path / "mmengine.pth")
    _same(load_checkpoint(tmp_path / "mmengine.pth"), sd)
    with pytest.raises(UnsafeCheckpointError, match=r"getattr\('numpy.ndarray', 'tofile'\)"):
        load_checkpoint(tmp_path / "gadget.pth")


# --- load_into: strict / non-strict ------------------------------------------------------
def test_imagenet_checkpoint_into_multi_scale_backbone(tmp_path, caplog) -> None:
    """Out norms an ImageNet checkpoint lacks are never left random silently."""
    path = tmp_path / "imagenet.pth"
    torch.save({"model": canonical_state_dict(_classifier())}, path)
    feats = ["stage2", "stage3", "stage4"]
    with pytest.raises(CheckpointMismatchError) as err:
        ConvNextBackbone.from_pretrained(path, out_features=feats)
    msg = str(err.value)
    for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm3.bias"):
        assert key in msg
    assert "strict=False" in msg
    assert err.value.report.missing_keys == [f"norm{i}.{t}" for i in (1, 2, 3) for t in ("weight", "bias")]

    with caplog.at_level(logging.WARNING, logger="convnext_backbone.checkpoints"):
        model = ConvNextBackbone.from_pretrained(path, out_features=feats, strict=False,
                                                 frozen_stages=1)
    report = model.load_report
    assert report.missing_keys == [f"norm{i}.{t}" for i in (1, 2, 3) for t in ("weight", "bias")]
    assert sorted(report.ignored_keys) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert report.unexpected_keys == [] and report.mismatched_shapes == []
    assert "norm1.weight" in caplog.text and "norm3.bias" in caplog.text
    assert model.out_features == feats and model.frozen_stages == 1
    assert not model.downsample_layers[0][0].weight.requires_grad


def test_shape_mismatch_names_key_and_shapes() -> None:
    sd = canonical_state_dict(_classifier(num_labels=5))
    model = ConvNextForImageClassification(_config(num_labels=9))
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(model, sd)
    assert "classifier.weight: checkpoint [5, 64] vs model [9, 64]" in str(err.value)
    before = model.classifier.weight.clone()
    report = load_into(model, sd, strict=False)
    assert report.mismatched_shapes == [("classifier.weight", (5, 64), (9, 64)),
                                        ("classifier.bias", (5,), (9,))]
    assert torch.equal(model.classifier.weight, before)  # not loaded
    assert torch.equal(model.convnext.stages[0][0].dwconv.weight, sd["stages.0.0.dwconv.weight"])


def test_unexpected_keys_strict_and_not() -> None:
    sd = canonical_state_dict(_classifier())
    sd["stages.3.1.dwconv.weight"] = torch.zeros(64, 1, 7, 7)  # a block the model lacks
    model = ConvNextModel(_config())
    sd["head.pre_logits.fc.weight"] = torch.zeros(64, 64)  # e.g. a timm MLP head we lack
    with pytest.raises(CheckpointMismatchError, match=r"unexpected 2: \['head.pre_logits.fc.weight', 'stages.3.1.dwconv.weight'\]"):
        load_into(model, sd)
    report = load_into(model, sd, strict=False)
    assert report.unexpected_keys == ["head.pre_logits.fc.weight", "stages.3.1.dwconv.weight"]
    assert report.missing_keys == []


# --- from_pretrained / save_pretrained ---------------------------------------------------
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("cls_name", ["backbone", "model", "classifier"])
def test_save_pretrained_round_trip(tmp_path, safe: bool, cls_name: str) -> None:
    model = {"backbone": lambda: _backbone(v2=True, out_features=["stem", "stage3"]),
             "model": lambda: _randomise(ConvNextModel(_config())),
             "classifier": lambda: _classifier(v2=True)}[cls_name]()
    model.save_pretrained(tmp_path, safe_serialization=safe)
    expected = {"model.safetensors" if safe else "pytorch_model.bin", "config.json"}
    assert set(os.listdir(tmp_path)) == expected
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.load_report.ok
    _same(loaded.state_dict(), model.state_dict())
    weights = load_checkpoint(tmp_path / ("model.safetensors" if safe else "pytorch_model.bin"))
    assert set(weights) == set(canonical_state_dict(model))  # canonical keys on disk
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == ("convnext" if cls_name == "model" else "convnextv2")


def test_from_pretrained_override_on_saved_directory(tmp_path) -> None:
    _backbone().save_pretrained(tmp_path)
    model = ConvNextBackbone.from_pretrained(tmp_path, out_features=["stage1", "stage4"],
                                             drop_path_rate=0.2)
    assert model.out_features == ["stage1", "stage4"] and model.config.drop_path_rate == 0.2
    # norm_stem, norm1, norm2 are in the checkpoint and not in this module: ignored.
    assert sorted(model.load_report.ignored_keys) == sorted(
        f"{n}.{t}" for n in ("norm_stem", "norm1", "norm2") for t in ("weight", "bias"))
    with pytest.raises(ValueError, match="frozen_stages"):
        ConvNextModel.from_pretrained(tmp_path, frozen_stages=1)
    with pytest.raises(ValueError, match=r"Unknown override\(s\) \['out_feature'\]; valid: .*out_features"):
        ConvNextBackbone.from_pretrained(tmp_path, out_feature=["stage1"])
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ConvNextModel.from_pretrained(tmp_path / "missing_dir")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ConvNextBackbone.from_pretrained(tmp_path)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_from_pretrained_transformers_directory(tmp_path, v2: bool) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg_cls = transformers.ConvNextV2Config if v2 else transformers.ConvNextConfig
    hf_bb_cls = transformers.ConvNextV2Backbone if v2 else transformers.ConvNextBackbone
    hf = _randomise(hf_bb_cls(hf_cfg_cls(hidden_sizes=SIZES, depths=DEPTHS,
                                         out_features=["stage2", "stage3", "stage4"])))
    hf.save_pretrained(tmp_path / "hf")
    model = ConvNextBackbone.from_pretrained(tmp_path / "hf")
    assert model.config.use_grn is v2 and model.out_features == ["stage2", "stage3", "stage4"]
    assert model.load_report.ok and model.load_report.source_format == "transformers"
    x = _x()
    with torch.no_grad():
        for a, b in zip(hf(x).feature_maps, model(x).feature_maps):
            assert (a - b).abs().max().item() <= 1e-5
    # Override: fewer stages than saved, the others' out norms are ignored.
    model = ConvNextBackbone.from_pretrained(tmp_path / "hf", out_features=["stage4"])
    assert model.out_features == ["stage4"]
    assert len(model.load_report.ignored_keys) == 4
    # pytorch_model.bin variant
    # A transformers directory with pytorch_model.bin (older transformers' default).
    os.makedirs(tmp_path / "hf_bin")
    hf.config.save_pretrained(tmp_path / "hf_bin")
    torch.save(hf.state_dict(), tmp_path / "hf_bin" / "pytorch_model.bin")
    model = ConvNextBackbone.from_pretrained(tmp_path / "hf_bin")
    assert model.load_report.ok
    with torch.no_grad():
        assert (hf(x).feature_maps[-1] - model(x).feature_maps[-1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_from_pretrained_single_file_every_format(tmp_path, fmt: str, ext: str) -> None:
    v2 = fmt != "torchvision"
    source = _classifier(v2=v2, num_labels=4)
    sd = from_canonical(canonical_state_dict(source), fmt)
    path = tmp_path / f"weights{ext}"
    ck.save_state_dict(sd, path, wrap={"official": "model", "mmpretrain": "state_dict"}.get(fmt)
                       if ext == ".pth" else None)
    x = _x()
    cls_model = ConvNextForImageClassification.from_pretrained(path)
    assert cls_model.load_report.ok and cls_model.load_report.source_format == fmt
    assert cls_model.config.num_labels == 4 and cls_model.config.use_grn is v2
    ref = ConvNextForImageClassification(source.config.copy(
        layer_norm_eps=1e-12 if fmt == "transformers" else 1e-6)).eval()
    load_into(ref, canonical_state_dict(source))
    with torch.no_grad():
        assert torch.equal(cls_model(x).logits, ref(x).logits)
        # The backbone from the same file, with an override and non-strict out norms.
        backbone = ConvNextBackbone.from_pretrained(path, out_features=["stage2", "stage4"], strict=False)
        assert backbone.load_report.missing_keys == ["norm1.weight", "norm1.bias", "norm3.weight", "norm3.bias"]
        hidden = backbone(x, output_hidden_states=True).hidden_states
        ref_hidden = ref.convnext(x, output_hidden_states=True).hidden_states
        for a, b in zip(hidden, ref_hidden):
            assert torch.equal(a, b)


# --- the convert tool ----------------------------------------------------------------------
def test_convert_tool_round_trip_subprocess(tmp_path) -> None:
    source = _classifier(v2=True)
    official = tmp_path / "official.pth"
    torch.save({"model": canonical_state_dict(source)}, official)
    timm_file = tmp_path / "timm.safetensors"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                           str(official), str(timm_file), "--to", "timm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "detected:    official" in proc.stdout
    n = len(canonical_state_dict(source))
    assert f"mapped:      {n} tensors -> {n} timm tensors" in proc.stdout
    assert "V2 (GRN), depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 32, 64]" in proc.stdout
    assert "converting" in proc.stderr  # the tqdm bar
    timm_sd = load_checkpoint(timm_file)
    assert detect_format(timm_sd) == "timm"
    _same(to_canonical(timm_sd)[0], canonical_state_dict(source))


@pytest.mark.parametrize("dst_format", FORMATS)
def test_convert_main_every_target(tmp_path, dst_format: str, capsys) -> None:
    source = _classifier(v2=False)
    src = tmp_path / "src.safetensors"
    ck.save_state_dict(from_canonical(canonical_state_dict(source), "transformers"), src)
    dst = tmp_path / f"out_{dst_format}.pth"
    assert convert_main([str(src), str(dst), "--to", dst_format, "--from", "transformers",
                         "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "detected:    transformers" in out and f"written:     {dst}" in out
    back, report = to_canonical(load_checkpoint(dst))
    assert report.src_format == dst_format
    _same(back, canonical_state_dict(source))


def test_convert_to_transformers_directory_loads_in_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    source = _classifier(v2=True, num_labels=3)
    src = tmp_path / "official.pth"
    torch.save({"model": canonical_state_dict(source)}, src)
    assert convert_main([str(src), str(tmp_path / "hf"), "--to", "transformers", "--no-progress"]) == 0
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["architectures"] == ["ConvNextV2ForImageClassification"]
    hf = transformers.ConvNextV2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    ref = ConvNextForImageClassification(source.config.copy(layer_norm_eps=1e-12)).eval()
    load_into(ref, canonical_state_dict(source))
    x = _x()
    with torch.no_grad():
        assert (hf(x).logits - ref(x).logits).abs().max().item() <= 1e-5


def test_convert_directory_keeps_its_config(tmp_path) -> None:
    # Labels, eps and out_features live only in config.json: converting a directory keeps
    # them instead of re-inferring the architecture from the tensors.
    source = _classifier(num_labels=3)
    source.config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    source.save_pretrained(tmp_path / "ours")
    assert convert_main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "transformers",
                         "--no-progress"]) == 0
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}


def test_convert_to_official_det_seg_layout(tmp_path) -> None:
    backbone = _backbone(out_features=["stage1", "stage2", "stage3", "stage4"])
    src = tmp_path / "hf.safetensors"
    ck.save_state_dict(from_canonical(canonical_state_dict(backbone), "transformers"), src)
    dst = tmp_path / "det.pth"
    assert convert_main([str(src), str(dst), "--to", "official", "--prefix", "backbone.",
                         "--no-progress"]) == 0
    raw = torch.load(dst, weights_only=True)
    assert set(raw) == {"state_dict"} and "backbone.norm3.weight" in raw["state_dict"]
    assert all(k.startswith("backbone.") for k in raw["state_dict"])
    loaded = ConvNextBackbone.from_pretrained(dst)
    assert loaded.load_report.ok and loaded.out_features == backbone.out_features
    _same(loaded.state_dict(), backbone.state_dict())


def test_convert_tool_errors(tmp_path) -> None:
    with pytest.raises(SystemExit, match="not found"):
        convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"), "--to", "timm"])
    ck.save_state_dict(canonical_state_dict(_backbone()), tmp_path / "bb.safetensors")
    with pytest.raises(SystemExit, match="--drop-unsupported"):
        convert_main([str(tmp_path / "bb.safetensors"), str(tmp_path / "o.pth"), "--to", "torchvision",
                      "--no-progress"])
    assert convert_main([str(tmp_path / "bb.safetensors"), str(tmp_path / "o.pth"), "--to", "torchvision",
                         "--drop-unsupported", "--no-progress"]) == 0
    with pytest.raises(SystemExit, match="extension"):
        convert_main([str(tmp_path / "bb.safetensors"), str(tmp_path / "o.npz"), "--to", "timm",
                      "--no-progress", "--drop-unsupported"])


def test_checkpoint_modules_import_torch_only() -> None:
    code = ("import sys, convnext_backbone.checkpoints, convnext_backbone.cli; "
            "bad = [m for m in ('safetensors', 'timm', 'transformers', 'torchvision') "
            "if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_saved_files_honour_the_umask(tmp_path):
    # Atomic writes go through mkstemp (mode 0600); the result must get the mode any file
    # the user writes gets (readable by colleagues on a shared cluster with umask 022).
    from convnext_backbone.io_utils import atomic_write_text

    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "a.json", "{}")
    ck.save_state_dict({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    for name in ("a.json", "w.safetensors"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o666 & ~umask, name
