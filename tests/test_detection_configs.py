"""The COCO Mask R-CNN configs carry the paper's recipe and build through mmengine."""
import glob
import os

import pytest

pytest.importorskip("mmengine")
pytest.importorskip("pycocotools")

from mmengine.config import Config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "convnext", "convnext-*_mask-rcnn_*coco.py")))
EXPECTED = {  # size: (drop path, num_layers)
    "tiny": (0.4, 6), "small": (0.6, 12), "base": (0.7, 12),
}


def test_all_sizes_and_schedules_present():
    names = {os.path.basename(p) for p in CONFIGS}
    for size in EXPECTED:
        for sched in ("1x", "3x"):
            assert f"convnext-{size}_mask-rcnn_fpn_8xb2-{sched}_coco.py" in names
    assert "convnext-tiny_mask-rcnn_fpn_8xb2-amp-3x_coco.py" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_recipe(path):
    cfg = Config.fromfile(path)
    size = os.path.basename(path).split("_")[0].split("-")[1]
    drop_path, num_layers = EXPECTED[size]
    assert cfg.custom_imports.imports == ["convnext_backbone.detection"]
    assert cfg.model.type == "TorchvisionDetector" and cfg.model.arch_or_config == size
    assert cfg.model.drop_path_rate == drop_path and cfg.model.num_classes == 81
    assert list(cfg.model.min_size) == list(range(480, 801, 32)) and cfg.model.max_size == 1333
    opt = cfg.optim_wrapper
    assert opt.optimizer.type == "AdamW" and opt.optimizer.lr == 1e-4 and opt.optimizer.weight_decay == 0.05
    assert opt.constructor == "DetectorLayerDecayOptimizerConstructor"
    assert opt.paramwise_cfg == dict(decay_rate=0.95, decay_type="layer_wise", num_layers=num_layers)
    assert opt.type == ("AmpOptimWrapper" if "amp" in path else "OptimWrapper")
    epochs = 36 if "3x" in path else 12
    assert cfg.train_cfg.max_epochs == epochs
    assert cfg.param_scheduler[1].milestones == ([27, 33] if epochs == 36 else [8, 11])
    flips = cfg.train_dataloader.dataset.transforms
    assert flips == [dict(type="RandomHorizontalFlip", prob=0.5)]
    assert cfg.train_dataloader.batch_size * 8 == 16  # 8 GPUs x 2 images
    assert cfg.val_evaluator.type == "ConvNextCocoMetric" and cfg.val_evaluator.metric == ["bbox", "segm"]


def test_tiny_config_builds_the_48m_model():
    import torch
    from mmengine.registry import MODELS

    import convnext_backbone.detection  # noqa: F401  (registers TorchvisionDetector)

    cfg = Config.fromfile(os.path.join(ROOT, "configs", "convnext", "convnext-tiny_mask-rcnn_fpn_8xb2-3x_coco.py"))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    # 81 classes (COCO's 80 + background) instead of torchvision's 91
    assert sum(p.numel() for p in model.parameters()) == 48_099_733
    assert model.detector.transform.min_size == tuple(range(480, 801, 32))
