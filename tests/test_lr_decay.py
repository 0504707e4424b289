"""Layer-/stage-wise learning-rate decay: every parameter's lr and weight decay read back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from convnext_backbone import ConvNextBackbone, ConvNextConfig
from convnext_backbone.lr_decay import get_layer_id, param_groups_lr_decay

BASE_LR, WD, RATE = 1e-4, 0.05, 0.9


class _Seg(nn.Module):
    """A segmentor-shaped model: ConvNeXt under `backbone.`, a head outside it."""

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        self.backbone = ConvNextBackbone(config)
        self.decode_head = nn.Sequential(nn.Conv2d(config.hidden_sizes[-1], 4, 1), nn.BatchNorm2d(4))


def _tiny_t_shaped(**kw) -> ConvNextConfig:
    # T's depths (the layer ids depend on them), small widths to stay fast
    return ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[8, 16, 32, 64],
                          out_indices=[1, 2, 3, 4], **kw)


def _per_param(groups):
    out = {}
    for g in groups:
        for name, p in zip(g["param_names"], g["params"]):
            assert name not in out, f"{name} in two groups"
            out[name] = (g["lr"], g["weight_decay"])
    return out


def test_stage_wise_learning_rates_match_official_formula():
    model = _Seg(_tiny_t_shaped())
    per = _per_param(param_groups_lr_decay(model, BASE_LR, WD, RATE, "stage_wise", num_layers=6))
    assert len(per) == sum(1 for _ in model.parameters())
    # ids: downsample 0, stage i -> i + 1, everything else num_layers + 1 (= 7, scale 1)
    assert per["backbone.downsample_layers.0.0.weight"] == pytest.approx((BASE_LR * RATE ** 7, WD))
    assert per["backbone.downsample_layers.2.1.weight"] == pytest.approx((BASE_LR * RATE ** 7, WD))
    assert per["backbone.stages.0.2.pwconv1.weight"] == pytest.approx((BASE_LR * RATE ** 6, WD))
    assert per["backbone.stages.2.8.dwconv.weight"] == pytest.approx((BASE_LR * RATE ** 4, WD))
    assert per["backbone.stages.3.0.pwconv2.weight"] == pytest.approx((BASE_LR * RATE ** 3, WD))
    assert per["backbone.norm3.weight"] == pytest.approx((BASE_LR, 0.0))
    assert per["decode_head.0.weight"] == pytest.approx((BASE_LR, WD))
    assert per["decode_head.1.weight"] == pytest.approx((BASE_LR, 0.0))


def test_layer_wise_learning_rates_match_official_formula():
    model = _Seg(_tiny_t_shaped())
    per = _per_param(param_groups_lr_decay(model, BASE_LR, WD, RATE, "layer_wise", num_layers=6))
    # ids: stem 0, stage0 1, ds1/stage1 2, ds2 3, stage2 block j -> 3 + j // 3, ds3/stage3 6
    expected_ids = {
        "backbone.downsample_layers.0.0.weight": 0, "backbone.stages.0.1.dwconv.weight": 1,
        "backbone.downsample_layers.1.1.weight": 2, "backbone.stages.1.2.pwconv1.weight": 2,
        "backbone.downsample_layers.2.1.weight": 3, "backbone.stages.2.0.pwconv1.weight": 3,
        "backbone.stages.2.4.pwconv1.weight": 4, "backbone.stages.2.8.pwconv1.weight": 5,
        "backbone.downsample_layers.3.1.weight": 6, "backbone.stages.3.2.pwconv2.weight": 6,
        "decode_head.0.weight": 7,
    }
    for name, layer_id in expected_ids.items():
        assert per[name] == pytest.approx((BASE_LR * RATE ** (7 - layer_id), WD)), name


def test_no_weight_decay_on_norms_biases_layer_scale_and_grn():
    model = _Seg(_tiny_t_shaped(use_grn=True, layer_scale_init_value=1e-6))
    per = _per_param(param_groups_lr_decay(model, BASE_LR, WD, RATE, "stage_wise", num_layers=6))
    no_decay = {n for n, (_, wd) in per.items() if wd == 0.0}
    for name, p in model.named_parameters():
        # norms' weights/biases and layer scale are 1-D; conv/linear weights are not
        assert (name in no_decay) == (p.ndim == 1 or ".grn." in name), name
    for name in ("backbone.stages.0.0.norm.weight", "backbone.norm0.weight", "backbone.stages.1.0.gamma",
                 "backbone.downsample_layers.1.0.weight", "backbone.stages.0.0.pwconv1.bias",
                 "decode_head.1.weight"):
        assert name in no_decay
    for name in ("backbone.stages.0.0.pwconv1.weight", "backbone.stages.0.0.dwconv.weight",
                 "backbone.downsample_layers.1.1.weight", "decode_head.0.weight"):
        assert per[name][1] == WD
    # GRN params are 4-D (1, 1, 1, 4C): the official 1-D rule alone would decay them
    assert model.backbone.stages[0][0].grn.gamma.ndim == 4
    assert "backbone.stages.0.0.grn.gamma" in no_decay and "backbone.stages.0.0.grn.beta" in no_decay


def test_bare_backbone_frozen_params_and_optimizer():
    backbone = ConvNextBackbone(_tiny_t_shaped(), frozen_stages=1)
    groups = param_groups_lr_decay(backbone, BASE_LR, WD, RATE, "stage_wise", num_layers=6)
    names = [n for g in groups for n in g["param_names"]]
    assert not any(n.startswith(("downsample_layers.0.", "stages.0.")) for n in names)
    assert len(names) == sum(1 for p in backbone.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=BASE_LR)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["stages.1.0.dwconv.weight"] == pytest.approx(BASE_LR * RATE ** 5)
    assert lrs["norm3.weight"] == pytest.approx(BASE_LR)


def test_errors_name_what_is_valid():
    model = _Seg(_tiny_t_shaped())
    with pytest.raises(ValueError, match="layer_wise"):
        param_groups_lr_decay(model, BASE_LR, WD, RATE, "block_wise", num_layers=6)
    with pytest.raises(ValueError, match="positive int"):
        param_groups_lr_decay(model, BASE_LR, WD, RATE, "stage_wise", num_layers=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        param_groups_lr_decay(model, BASE_LR, WD, 1.5, "stage_wise", num_layers=6)
    deep = _Seg(ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[8, 16, 32, 64]))
    with pytest.raises(ValueError, match="raise num_layers"):
        param_groups_lr_decay(deep, BASE_LR, WD, RATE, "layer_wise", num_layers=6)
    assert get_layer_id("backbone.stages.2.26.gamma", 12, "layer_wise") == 11


def test_mmengine_constructor_sets_group_lrs():
    pytest.importorskip("mmengine")
    from mmengine.optim import build_optim_wrapper

    import convnext_backbone.lr_decay  # noqa: F401  registers the constructor

    model = _Seg(_tiny_t_shaped())
    wrapper = build_optim_wrapper(model, dict(
        type="OptimWrapper", optimizer=dict(type="AdamW", lr=BASE_LR, weight_decay=WD),
        constructor="ConvNextLayerDecayOptimizerConstructor",
        paramwise_cfg=dict(decay_rate=RATE, decay_type="stage_wise", num_layers=6)))
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups
                for p in g["params"]}
    expected = _per_param(param_groups_lr_decay(model, BASE_LR, WD, RATE, "stage_wise", 6))
    for name, p in model.named_parameters():
        assert by_param[id(p)] == pytest.approx(expected[name]), name
    with pytest.raises(ValueError, match="not supported"):
        build_optim_wrapper(model, dict(
            type="OptimWrapper", optimizer=dict(type="AdamW", lr=BASE_LR, weight_decay=WD),
            constructor="ConvNextLayerDecayOptimizerConstructor",
            paramwise_cfg=dict(decay_rate=RATE, num_layers=6, layer_decay_rate=0.9)))
