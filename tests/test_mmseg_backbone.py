"""The mmseg-registered `ConvNeXt`: parity with the core backbone, the out_indices convention,
pretrained loading from every checkpoint format, and mmseg's own LR-decay constructor."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("mmseg", reason="needs mmsegmentation with compiled mmcv ops")
pytestmark = pytest.mark.mmseg

from mmseg.registry import MODELS  # noqa: E402

from convnext_backbone import ConvNextBackbone, ConvNextConfig  # noqa: E402
from convnext_backbone.mmseg import ConvNeXt  # noqa: E402

SMALL = dict(depths=[1, 1, 2, 1], channels=[8, 16, 32, 64])


def _core(out_indices, **kw) -> ConvNextBackbone:
    return ConvNextBackbone(ConvNextConfig(depths=SMALL["depths"], hidden_sizes=SMALL["channels"],
                                           out_indices=out_indices, **kw))


@pytest.mark.parametrize("mmseg_indices, core_indices", [((0, 1, 2, 3), [1, 2, 3, 4]),
                                                         ((1, 3), [2, 4]), ((-2, -1), [3, 4])])
def test_registered_backbone_matches_core_backbone(mmseg_indices, core_indices):
    torch.manual_seed(0)
    core = _core(core_indices).eval()
    # a random, non-default state (layer scale 1, perturbed norms) so parity is not trivial
    with torch.no_grad():
        for p in core.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    backbone = MODELS.build(dict(type="ConvNeXt", arch=SMALL, out_indices=mmseg_indices)).eval()
    assert list(backbone.state_dict()) == list(core.state_dict())  # same (official) names
    backbone.load_state_dict(core.state_dict())
    x = torch.randn(2, 3, 72, 88)  # not a multiple of 32: padded and cropped the same way
    with torch.no_grad():
        ours = backbone(x)
        ref = core(x).feature_maps
    assert isinstance(ours, list) and len(ours) == len(core_indices)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_out_indices_convention_convnext_tiny():
    backbone = ConvNeXt(arch="tiny", out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4),
                                              (1, 768, 2, 2)]
    assert backbone.channels == [96, 192, 384, 768] and backbone.strides == [4, 8, 16, 32]
    assert ConvNeXt(arch="tiny", out_indices=(-1,)).out_features == ["stage4"]
    assert ConvNeXt(arch="tiny", out_indices=2).mmseg_out_indices == [2]
    assert ConvNeXt(arch="tiny", out_features=["stem", "stage3"]).channels == [96, 384]
    names = {n for n, _ in ConvNeXt(arch="tiny").named_parameters()}
    assert {"downsample_layers.0.0.weight", "stages.2.8.gamma", "norm0.weight", "norm3.bias"} <= names


@pytest.mark.parametrize("bad, message", [
    ((0, 4), r"index 4 is out of range; valid indices: \[0, 1, 2, 3\] \(or negative, down to -4\)"),
    ((-5,), r"index -5 is out of range; valid indices: \[0, 1, 2, 3\]"),
    ((1, 1), "names a stage twice"),
    ((3, -1), "names a stage twice"),
    ((2, 1), "must be in stage order"),
    ((), "must not be empty"),
])
def test_out_indices_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ConvNeXt(arch=SMALL, out_indices=bad)


def test_argument_errors_and_aliases():
    with pytest.raises(ValueError, match="valid names: .*'tiny'"):
        ConvNeXt(arch="medium")
    with pytest.raises(ValueError, match=r"frozen_stages must be an int in \[-1, 4\]"):
        ConvNeXt(arch=SMALL, frozen_stages=5)
    with pytest.raises(ValueError, match="gap_before_final_norm"):
        ConvNeXt(arch=SMALL, gap_before_final_norm=True)
    # the official facebookresearch config's arguments
    official = ConvNeXt(in_chans=3, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768],
                        drop_path_rate=0.4, layer_scale_init_value=1.0, out_indices=[0, 1, 2, 3])
    assert official.config.depths == [3, 3, 9, 3] and official.channels == [96, 192, 384, 768]
    assert float(official.stages[0][0].gamma[0]) == 1.0
    v2 = ConvNeXt(arch="v2-atto")
    assert v2.config.use_grn and v2.stages[0][0].gamma is None and v2.channels == [40, 80, 160, 320]


def test_frozen_stages_and_with_cp(checkpoint_calls):
    torch.manual_seed(0)
    frozen = ConvNeXt(arch=SMALL, frozen_stages=2).train()
    assert not any(p.requires_grad for p in frozen.stages[1].parameters())
    assert all(p.requires_grad for p in frozen.stages[2].parameters())
    assert not frozen.stages[0].training and frozen.stages[2].training
    assert ConvNeXt(arch=SMALL, frozen_stages=-1).frozen_stages == 0

    plain = ConvNeXt(arch=SMALL, drop_path_rate=0.0).train()
    cp = ConvNeXt(arch=SMALL, with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, cp):
        sum(o.square().mean() for o in model(x)).backward()
    assert len(checkpoint_calls) == sum(cp.config.depths)  # with_cp really checkpoints, every block
    for (name, a), (_, b) in zip(plain.named_parameters(), cp.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("fmt", ["official", "mmpretrain", "transformers", "timm", "torchvision",
                                 "segmentor"])
def test_init_cfg_pretrained_loads_every_format(tmp_path, fmt):
    from convnext_backbone.checkpoints import FORMATS, from_canonical

    assert set(FORMATS) == {"official", "mmpretrain", "transformers", "timm", "torchvision"}
    torch.manual_seed(1)
    source = _core([1, 2, 3, 4])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    canonical = source.state_dict()
    prefix = None
    if fmt == "segmentor":  # an mmseg checkpoint of a whole UperNet: prefix selects the backbone
        state = {"state_dict": {**{f"backbone.{k}": v for k, v in canonical.items()},
                                "decode_head.conv_seg.weight": torch.zeros(150, 8, 1, 1)},
                 "meta": {"iter": 10}}
        prefix = "backbone."
    else:
        state = from_canonical(canonical, fmt, drop_unsupported=True)
        if fmt == "official":
            state = {"model": state}
    path = tmp_path / f"{fmt}.pth"
    torch.save(state, path)

    backbone = MODELS.build(dict(type="ConvNeXt", arch=SMALL, init_cfg=dict(
        type="Pretrained", checkpoint=str(path), prefix=prefix)))
    backbone.init_weights()
    assert backbone.is_init
    loaded = backbone.state_dict()
    trunk = [k for k in canonical if k.startswith(("downsample_layers", "stages"))]
    assert len(trunk) == 4 * 2 * 2 + 5 * 9  # every trunk tensor is compared
    for key in trunk:
        torch.testing.assert_close(loaded[key], canonical[key], rtol=0, atol=0, msg=key)
    if fmt in ("official", "segmentor", "mmpretrain"):  # these formats carry the out norms
        for i in range(3):  # mmpretrain's norm3 is ambiguous with its pooled norm; 0..2 are not
            torch.testing.assert_close(loaded[f"norm{i}.weight"], canonical[f"norm{i}.weight"])


def test_mmseg_constructor_and_ours_give_same_lr_and_wd():
    """mmseg's LearningRateDecayOptimizerConstructor and this package's, on a ConvNeXt-T."""
    import mmseg.engine  # noqa: F401  registers mmseg's constructor
    from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

    class Segmentor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = ConvNeXt(arch="tiny")
            self.decode_head = nn.Sequential(nn.Conv2d(768, 8, 3), nn.BatchNorm2d(8))
            self.auxiliary_head = nn.Conv2d(384, 8, 1)

    model = Segmentor()
    model.backbone.stages[0][0].gamma.requires_grad_(False)  # frozen: left out by both
    for decay_type, num_layers in (("stage_wise", 6), ("layer_wise", 6), ("stage_wise", 12)):
        results = []
        for constructor in ("LearningRateDecayOptimizerConstructor",
                            "ConvNextLayerDecayOptimizerConstructor"):
            wrapper = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
                type=constructor,
                optim_wrapper_cfg=dict(type="OptimWrapper", optimizer=dict(
                    type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)),
                paramwise_cfg=dict(decay_rate=0.9, decay_type=decay_type, num_layers=num_layers)))(model)
            results.append({id(p): (g["lr"], g["weight_decay"])
                            for g in wrapper.optimizer.param_groups for p in g["params"]})
        theirs, ours = results
        assert len(theirs) == len(ours) == sum(1 for p in model.parameters() if p.requires_grad)
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert ours[id(p)] == pytest.approx(theirs[id(p)]), (decay_type, name)
        # the decay really is applied (mmseg falls back to no decay for unknown backbones)
        lrs = sorted({lr for lr, _ in ours.values()})
        assert len(lrs) >= 5 and lrs[-1] == pytest.approx(1e-4)
