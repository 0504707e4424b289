"""convnext_backbone.torchvision: FPN backbone contract, detector builders, checkpoints."""
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("torchvision")

from torchvision.models.detection import FasterRCNN, MaskRCNN  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

from convnext_backbone import ConvNextBackbone, ConvNextConfig  # noqa: E402
from convnext_backbone.torchvision import (ConvNextFPNBackbone, convnext_fpn_backbone,  # noqa: E402
                                           fasterrcnn_convnext_fpn, maskrcnn_convnext_fpn)

TINY = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1])
SMALL_HEADS = dict(out_channels=32, box_representation_size=64, mask_head_channels=[16],
                   min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128])


def test_fpn_keys_channels_strides():
    torch.manual_seed(0)
    backbone = convnext_fpn_backbone(TINY, out_channels=32).eval()
    assert isinstance(backbone, ConvNextFPNBackbone) and backbone.out_channels == 32
    out = backbone(torch.randn(2, 3, 96, 128))
    assert isinstance(out, OrderedDict)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    # strides 4, 8, 16, 32 and the max-pooled 64
    assert [tuple(v.shape) for v in out.values()] == [
        (2, 32, 24, 32), (2, 32, 12, 16), (2, 32, 6, 8), (2, 32, 3, 4), (2, 32, 2, 2)]
    shapes = backbone.output_shape()
    assert [(s.channels, s.stride) for s in shapes.values()] == [(32, 4), (32, 8), (32, 16), (32, 32), (32, 64)]
    # FPN lateral convs read the trunk's channels
    assert [m[0].in_channels for m in backbone.fpn.inner_blocks] == [8, 16, 32, 64]


def test_fpn_matches_trunk_plus_torchvision_fpn():
    """The composition is exactly: core backbone maps (with out norms) -> torchvision FPN."""
    torch.manual_seed(0)
    backbone = convnext_fpn_backbone(TINY, out_channels=16).eval()
    x = torch.randn(1, 3, 64, 64)
    maps = backbone.body(x).feature_maps
    expected = backbone.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
    got = backbone(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_fpn_returned_stages_and_extra_blocks():
    backbone = convnext_fpn_backbone(TINY, returned_stages=[2, 4], out_channels=16,
                                     extra_blocks=LastLevelP6P7(16, 16)).eval()
    assert backbone.body.out_features == ["stage2", "stage4"]
    out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["0", "1", "p6", "p7"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(8, 8), (2, 2), (1, 1), (1, 1)]


def test_fpn_norm_layer_and_config_object():
    cfg = ConvNextConfig(**TINY)
    backbone = convnext_fpn_backbone(cfg, norm_layer=torch.nn.BatchNorm2d, out_channels=16)
    assert isinstance(backbone.fpn.layer_blocks[0][1], torch.nn.BatchNorm2d)
    assert cfg.out_features == ["stage4"]  # the caller's config is not modified


@pytest.mark.parametrize("trainable, frozen_prefixes", [
    (4, []),
    (3, ["downsample_layers.0.", "stages.0."]),
    (0, ["downsample_layers.", "stages."]),
])
def test_trainable_stages(trainable, frozen_prefixes):
    backbone = convnext_fpn_backbone(TINY, trainable_stages=trainable)
    for name, p in backbone.body.named_parameters():
        frozen = any(name.startswith(pref) for pref in frozen_prefixes)
        assert p.requires_grad is (not frozen), name
    backbone.train()
    # frozen stages stay in eval mode (drop path / norms behave as at inference)
    if trainable < 4:
        assert not backbone.body.stages[0].training
    assert all(p.requires_grad for p in backbone.fpn.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(trainable_stages=5), r"trainable_stages should be an int in the range \[0,4\]"),
    (dict(trainable_stages=-1), r"range \[0,4\]"),
    (dict(trainable_stages=True), r"range \[0,4\]"),
    (dict(returned_stages=[0, 1]), r"Each returned stage should be in the range \[1,4\]"),
    (dict(returned_stages=[1, 5]), r"range \[1,4\]"),
    (dict(returned_stages=[]), r"range \[1,4\]"),
    (dict(returned_stages=[3, 2]), "increasing"),
    (dict(returned_stages="1234"), r"range \[1,4\]"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        convnext_fpn_backbone(TINY, **kwargs)


def test_bad_arch_raises():
    with pytest.raises(ValueError, match="valid"):
        convnext_fpn_backbone("tinyy")
    with pytest.raises(TypeError, match="variant name"):
        convnext_fpn_backbone(3)
    with pytest.raises(ValueError, match="one size per FPN level"):
        maskrcnn_convnext_fpn(TINY, num_classes=3, anchor_sizes=[8, 16])


def test_maskrcnn_tiny_has_paper_param_count():
    torch.manual_seed(0)
    model = maskrcnn_convnext_fpn("tiny", num_classes=91)
    assert isinstance(model, MaskRCNN)
    n = sum(p.numel() for p in model.parameters())
    # The paper's table: Mask R-CNN + ConvNeXt-T, 48M parameters.
    assert n == 48_153_553
    # drop path as in the official COCO config for T: 0.4 at the last block
    last = model.backbone.body.stages[3][-1].drop_path
    assert last.drop_prob == pytest.approx(0.4)
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333


def test_maskrcnn_custom_box_head_with_default_mask_head():
    # A non-default box head means MaskRCNN gets num_classes=None: the mask predictor must
    # still be sized for the classes.
    model = maskrcnn_convnext_fpn(TINY, num_classes=4, out_channels=32, box_representation_size=64)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_drop_path_defaults_per_size():
    small = fasterrcnn_convnext_fpn(dict(TINY), num_classes=3)
    assert small.backbone.body.config.drop_path_rate == 0.0  # a config keeps its own value
    assert isinstance(small, FasterRCNN)


def _targets(n_img=2, size=64):
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(n_img):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks))
    images = [torch.rand(3, size, size, generator=g) for _ in range(n_img)]
    return images, targets


def test_maskrcnn_train_losses_and_eval_detections():
    torch.manual_seed(0)
    model = maskrcnn_convnext_fpn(TINY, num_classes=3, **SMALL_HEADS)
    images, targets = _targets()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trunk_grads = [p.grad for p in model.backbone.body.parameters()]
    assert all(g is not None for g in trunk_grads)
    assert sum(float(g.abs().sum()) for g in trunk_grads) > 0

    model.eval()
    model.roi_heads.score_thresh = 0.0  # untrained: keep every detection
    with torch.no_grad():
        dets = model([images[0], torch.rand(3, 48, 80)])
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(64, 64), (48, 80)]):
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, h, w)  # back at the input image size
        assert n > 0  # score_thresh 0: an empty result would skip the checks below
        assert det["labels"].min() >= 1 and det["labels"].max() <= 2
        assert float(det["boxes"][:, 2].max()) <= w and float(det["boxes"][:, 3].max()) <= h


def test_fasterrcnn_train_and_eval():
    torch.manual_seed(0)
    kwargs = {k: v for k, v in SMALL_HEADS.items() if k != "mask_head_channels"}
    model = fasterrcnn_convnext_fpn(TINY, num_classes=3, **kwargs)
    images, targets = _targets()
    for t in targets:
        del t["masks"]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    model.eval()
    with torch.no_grad():
        det = model(images[:1])[0]
    assert set(det) == {"boxes", "labels", "scores"}


def test_multiscale_min_size_is_tuple():
    model = maskrcnn_convnext_fpn(TINY, num_classes=3, min_size=[32, 48, 64], max_size=100)
    assert model.transform.min_size == (32, 48, 64)


def test_checkpoint_loading_every_trunk_tensor(tmp_path):
    """A classification checkpoint (no out norms) fills the whole trunk."""
    pytest.importorskip("safetensors")
    from convnext_backbone import ConvNextForImageClassification

    torch.manual_seed(1)
    clf = ConvNextForImageClassification(ConvNextConfig(**TINY, num_labels=5))
    directory = tmp_path / "clf"
    clf.save_pretrained(str(directory))
    torch.manual_seed(2)
    backbone = convnext_fpn_backbone(TINY, checkpoint=str(directory / "model.safetensors"))
    ref = dict(clf.named_parameters())
    for name, p in backbone.body.named_parameters():
        if name.startswith("norm"):
            continue  # out norms: not in a classifier checkpoint
        torch.testing.assert_close(p, ref["convnext." + name], rtol=0, atol=0)
    # a directory works too, and a checkpoint of another width raises
    backbone2 = convnext_fpn_backbone(TINY, checkpoint=str(directory))
    torch.testing.assert_close(backbone2.body.stages[2][1].pwconv1.weight,
                               clf.convnext.stages[2][1].pwconv1.weight)
    with pytest.raises(ValueError, match="does not fit"):
        convnext_fpn_backbone(dict(hidden_sizes=[8, 16, 32, 48], depths=[1, 1, 2, 1]),
                              checkpoint=str(directory))


def test_backbone_checkpoint_through_builder(tmp_path):
    """A backbone checkpoint (with out norms) loads through maskrcnn_convnext_fpn."""
    pytest.importorskip("safetensors")
    torch.manual_seed(3)
    src = ConvNextBackbone(ConvNextConfig(**TINY, out_features=["stage1", "stage2", "stage3", "stage4"]))
    src.save_pretrained(str(tmp_path))
    model = maskrcnn_convnext_fpn(TINY, num_classes=3, checkpoint=str(tmp_path), **SMALL_HEADS)
    for (name, p), (name2, q) in zip(model.backbone.body.state_dict().items(), src.state_dict().items()):
        assert name == name2
        torch.testing.assert_close(p, q, rtol=0, atol=0)
