"""Every config under configs/ builds; parameter counts match the paper's; analyze works."""
from __future__ import annotations

import glob
import os.path as osp
import sys

import pytest
import torch

pytest.importorskip("mmseg", reason="needs mmsegmentation with compiled mmcv ops")
pytestmark = pytest.mark.mmseg

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, "tools"))
import analyze  # noqa: E402

CONFIGS = sorted(glob.glob(osp.join(REPO, "configs", "convnext", "*upernet*.py")))

# The paper's Table (ADE20K, UperNet): parameters in millions, rounded.
PAPER_PARAMS_M = {
    "convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py": 60,
    "convnext-small_upernet_8xb2-amp-160k_ade20k-512x512.py": 82,
    "convnext-base_upernet_8xb2-amp-160k_ade20k-512x512.py": 122,
    "convnext-base_upernet_8xb2-amp-160k_ade20k-640x640.py": 122,
    "convnext-large_upernet_8xb2-amp-160k_ade20k-640x640.py": 235,
    "convnext-xlarge_upernet_8xb2-amp-160k_ade20k-640x640.py": 391,
}


def _build_on_meta(config: str) -> torch.nn.Module:
    # meta tensors: the structure and parameter count without allocating 390M floats
    with torch.device("meta"):
        return analyze.build_model(config)


def test_every_config_is_listed():
    names = {osp.basename(c) for c in CONFIGS}
    assert set(PAPER_PARAMS_M) <= names
    assert {n for n in names if n.startswith("convnextv2-")} == {
        "convnextv2-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py",
        "convnextv2-base_upernet_8xb2-amp-160k_ade20k-512x512.py",
        "convnextv2-large_upernet_8xb2-amp-160k_ade20k-640x640.py",
        "convnextv2-huge_upernet_8xb2-amp-160k_ade20k-640x640.py"}


@pytest.mark.parametrize("config", CONFIGS, ids=[osp.basename(c) for c in CONFIGS])
def test_config_builds(config):
    from mmengine.config import Config

    from convnext_backbone import ConvNextBackbone, ConvNextConfig
    from convnext_backbone.mmseg import ConvNeXt

    cfg = Config.fromfile(config)
    assert cfg.default_scope == "mmseg"
    assert "convnext_backbone.mmseg" in cfg.custom_imports["imports"]
    model = _build_on_meta(config)
    backbone = model.backbone
    assert type(backbone) is ConvNeXt
    assert backbone.channels == list(cfg.model.decode_head.in_channels)
    assert cfg.model.auxiliary_head.in_channels == backbone.channels[2]
    # the backbone is the core backbone: same parameter count as ConvNextBackbone
    arch = cfg.model.backbone.arch
    if "depths" not in cfg.model.backbone:  # the paper's configs (not the demo)
        core_cfg = ConvNextConfig.from_variant(arch, out_indices=[1, 2, 3, 4])
        with torch.device("meta"):
            core = ConvNextBackbone(core_cfg)
        assert sum(p.numel() for p in backbone.parameters()) == sum(p.numel() for p in core.parameters())
        assert cfg.model.decode_head.num_classes == 150
        # the paper's recipe
        assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == 1e-4
        assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
        assert cfg.optim_wrapper.paramwise_cfg.decay_type == "stage_wise"
        assert cfg.optim_wrapper.paramwise_cfg.num_layers == (6 if "tiny" in arch else 12)
        assert cfg.train_cfg.max_iters == 160000
        assert cfg.train_dataloader.batch_size * 8 == 16
        assert cfg.model.backbone.drop_path_rate == (0.3 if arch in ("tiny", "v2-tiny") else 0.4)
        crop = 640 if "640x640" in config else 512
        assert tuple(cfg.crop_size) == (crop, crop)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_the_paper(name):
    model = _build_on_meta(osp.join(REPO, "configs", "convnext", name))
    params = sum(p.numel() for p in model.parameters())
    if name.startswith("convnext-tiny"):
        assert params == 60_242_636  # ENVIRONMENT.md: measured with mmseg's own UperNet-T
    assert abs(params / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.01, params


def test_tools_build_without_pretrained_files():
    # tools/test.py and analyze build the model without reading ImageNet weights: the
    # segmentor's init_cfg and the detector's `checkpoint` argument are both dropped.
    model = analyze.build_model(
        osp.join(REPO, "configs/convnext/convnext-demo_mask-rcnn_fpn_1xb4-300it_tiny-shapes-128.py"),
        {"model.checkpoint": "/nonexistent/imagenet.pth"})
    assert sum(p.numel() for p in model.parameters()) > 0


def test_analyze_tool_params_and_flops():
    config = osp.join(REPO, "configs", "convnext", "convnext-demo_upernet_1xb8-1000it_tiny-ade20k-128x128.py")
    result = analyze.analyze(config, shape=(128, 128))
    model = analyze.build_model(config)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["params_backbone"] == sum(p.numel() for p in model.backbone.parameters())
    # FLOPs of the backbone alone, counted by hand: every conv/linear's multiply-adds
    backbone = model.backbone
    expected_backbone = 0
    h = 128 // 4
    expected_backbone += 3 * 16 * 4 * 4 * h * h  # stem
    for i, (depth, c) in enumerate(zip([1, 1, 2, 1], [16, 32, 64, 128])):
        if i > 0:
            expected_backbone += (c // 2) * c * 2 * 2 * h * h
        expected_backbone += depth * (c * 49 + 2 * c * 4 * c) * h * h
        h //= 2
    from mmengine.analysis import FlopAnalyzer

    backbone_flops = FlopAnalyzer(backbone.eval(), (torch.randn(1, 3, 128, 128),))
    backbone_flops.unsupported_ops_warnings(False)
    # layer norms/GELU add a few percent on top of the convolutions
    assert expected_backbone <= backbone_flops.total() < 1.1 * expected_backbone
    assert result["flops"] > backbone_flops.total()


@pytest.mark.slow
def test_upernet_tiny_flops_match_the_paper():
    """The paper: 939 GFLOPs at 2048x512 for UperNet + ConvNeXt-T (measured here: 939.7G)."""
    config = osp.join(REPO, "configs", "convnext", "convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py")
    result = analyze.analyze(config, shape=(512, 2048))
    assert result["params"] == 60_242_636
    assert abs(result["flops"] / 1e9 - 939) / 939 < 0.01, result["flops"]
