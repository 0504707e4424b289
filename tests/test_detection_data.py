"""convnext_backbone.detection: COCO dataset, transforms, metric, mmengine model wrapper."""
import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("mmengine")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from convnext_backbone.detection import (CocoInstanceDataset, CocoMetric,  # noqa: E402
                                         DetectorLayerDecayOptimizerConstructor,
                                         RandomHorizontalFlip, TorchvisionDetector, detection_collate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_tiny_coco import make_tiny_coco  # noqa: E402

TINY_DET = dict(arch_or_config=dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1]), num_classes=4,
                out_channels=16, box_representation_size=32, mask_head_channels=[8], min_size=64,
                max_size=64, anchor_sizes=[8, 16, 32, 64, 128])


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_coco"))
    # every 3rd object as compressed RLE, a crowd region (uncompressed RLE) on every 2nd image
    return make_tiny_coco(root, num_train=6, num_val=4, size=64, seed=3, rle_every=3, crowd_every=2)


def _decode(segm, h, w):
    if isinstance(segm, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segm, h, w)))
    if isinstance(segm["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(segm, h, w))
    return mask_utils.decode(segm)


def test_dataset_round_trips_the_json(coco):
    from PIL import Image

    with open(coco["train_ann"]) as f:
        data = json.load(f)
    kinds = {("poly" if isinstance(a["segmentation"], list) else
              "rle" if isinstance(a["segmentation"]["counts"], list) else "crle") for a in data["annotations"]}
    assert kinds == {"poly", "rle", "crle"}  # all three encodings are exercised
    ds = CocoInstanceDataset(coco["train_ann"], coco["train_img_dir"])
    assert ds.cat_ids == [1, 3, 5] and ds.classes == ("square", "circle", "triangle")
    assert ds.num_classes == 4 and ds.label_to_cat_id == {1: 1, 2: 3, 3: 5}
    assert len(ds) == 6 and ds.img_ids == [img["id"] for img in data["images"]]
    images = {img["id"]: img for img in data["images"]}
    seen_crowd = 0
    for i in range(len(ds)):
        sample = ds[i]
        image, target = sample["inputs"], sample["data_samples"]
        info = images[target["image_id"]]
        pixels = np.array(Image.open(os.path.join(coco["train_img_dir"], info["file_name"])).convert("RGB"))
        torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        seen_crowd += sum(a["iscrowd"] for a in anns)
        anns = [a for a in anns if not a["iscrowd"]]  # crowd regions are not training targets
        assert target["boxes"].shape == (len(anns), 4)
        expected_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        torch.testing.assert_close(target["boxes"], expected_boxes.float())
        assert target["labels"].tolist() == [ds.cat_id_to_label[a["category_id"]] for a in anns]
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(anns), 64, 64)
        for m, a in zip(target["masks"], anns):
            expected = _decode(a["segmentation"], 64, 64)
            assert torch.equal(m, torch.from_numpy(expected))
            assert int(m.sum()) == pytest.approx(a["area"], abs=1)
    assert seen_crowd == 3


def test_filter_empty_and_test_mode(coco, tmp_path):
    with open(coco["train_ann"]) as f:
        data = json.load(f)
    first = data["images"][0]["id"]  # has a crowd region (crowd_every=2)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first or a["iscrowd"]]
    path = tmp_path / "only_crowd.json"
    path.write_text(json.dumps(data))
    ds = CocoInstanceDataset(str(path), coco["train_img_dir"])
    assert first not in ds.img_ids and len(ds) == 5
    ds_all = CocoInstanceDataset(str(path), coco["train_img_dir"], filter_empty_gt=False)
    target = ds_all[0]["data_samples"]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 64, 64)
    test = CocoInstanceDataset(str(path), coco["train_img_dir"], test_mode=True)
    assert len(test) == 6
    assert set(test[0]["data_samples"]) == {"image_id", "orig_size"}
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoInstanceDataset(str(tmp_path / "missing.json"), coco["train_img_dir"])
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        CocoInstanceDataset(str(path), coco["train_img_dir"], transforms=[dict(type="Resize")])


def test_flip_and_collate(coco):
    plain = CocoInstanceDataset(coco["train_ann"], coco["train_img_dir"])
    flipped = CocoInstanceDataset(coco["train_ann"], coco["train_img_dir"],
                                  transforms=[dict(type="RandomHorizontalFlip", prob=1.0)])
    a, b = plain[1], flipped[1]
    torch.testing.assert_close(b["inputs"], a["inputs"].flip(-1))
    torch.testing.assert_close(b["data_samples"]["masks"], a["data_samples"]["masks"].flip(-1))
    boxes = a["data_samples"]["boxes"]
    expected = torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(b["data_samples"]["boxes"], expected)
    # the flipped box still bounds the flipped mask
    for box, m in zip(b["data_samples"]["boxes"], b["data_samples"]["masks"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RandomHorizontalFlip(1.5)
    batch = detection_collate([plain[0], plain[1]])
    assert set(batch) == {"inputs", "data_samples"}
    assert len(batch["inputs"]) == 2 and batch["data_samples"][1]["image_id"] == plain.img_ids[1]


def _gt_predictions(ds, shift=0.0):
    preds = []
    for i in range(len(ds)):
        t = ds.load_target(ds.img_ids[i])
        n = len(t["labels"])
        boxes = t["boxes"] + shift
        preds.append(dict(image_id=t["image_id"], boxes=boxes, labels=t["labels"],
                          scores=torch.linspace(0.9, 0.5, n), masks=t["masks"][:, None].float()))
    return preds


def test_metric_matches_pycocotools(coco, tmp_path):
    ds = CocoInstanceDataset(coco["val_ann"], coco["val_img_dir"])
    # perfect predictions: AP 1
    metric = CocoMetric(coco["val_ann"], outfile_prefix=str(tmp_path / "perfect"))
    metric.process({}, _gt_predictions(ds))
    out = metric.evaluate(len(ds))
    assert out["coco/bbox_mAP"] == 1.0 and out["coco/segm_mAP"] == 1.0
    assert set(out) == {f"coco/{m}_{s}" for m in ("bbox", "segm")
                        for s in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")}
    # shifted boxes: numbers equal a direct COCOeval of the written results JSON
    metric = CocoMetric(coco["val_ann"], metric="bbox", outfile_prefix=str(tmp_path / "shifted"))
    metric.process({}, _gt_predictions(ds, shift=3.0))
    out = metric.evaluate(len(ds))
    written = json.loads((tmp_path / "shifted.bbox.json").read_text())
    assert len(written) == sum(len(ds.load_target(i)["labels"]) for i in ds.img_ids)
    assert {w["category_id"] for w in written} <= {1, 3, 5}  # labels mapped back to COCO ids
    gt = COCO(coco["val_ann"])
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "shifted.bbox.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert 0.0 < out["coco/bbox_mAP"] < 1.0
    assert out["coco/bbox_mAP"] == pytest.approx(ev.stats[0], abs=1e-4)
    assert out["coco/bbox_mAP_75"] == pytest.approx(ev.stats[2], abs=1e-4)
    assert not (tmp_path / "shifted.segm.json").exists()


def test_metric_empty_predictions_and_bad_args(coco):
    metric = CocoMetric(coco["val_ann"])
    empty = torch.zeros(0, 4)
    metric.process({}, [dict(image_id=2000, boxes=empty, labels=torch.zeros(0, dtype=torch.int64),
                             scores=torch.zeros(0), masks=torch.zeros(0, 1, 64, 64))])
    out = metric.evaluate(1)
    assert out["coco/bbox_mAP"] == 0.0 and out["coco/segm_mAP"] == 0.0
    with pytest.raises(ValueError, match="bbox"):
        CocoMetric(coco["val_ann"], metric="proposal")


def test_wrapper_loss_predict_and_layer_decay(coco):
    torch.manual_seed(0)
    ds = CocoInstanceDataset(coco["train_ann"], coco["train_img_dir"])
    model = TorchvisionDetector(**TINY_DET)
    batch = model.data_preprocessor(detection_collate([ds[0], ds[1]]), True)
    model.train()
    losses = model(**batch, mode="loss")
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    model.eval()
    with torch.no_grad():
        preds = model(**batch, mode="predict")
        feats = model(batch["inputs"], mode="tensor")
    assert [p["image_id"] for p in preds] == ds.img_ids[:2]
    assert list(feats) == ["0", "1", "2", "3", "pool"] and feats["0"].shape == (2, 16, 16, 16)

    from mmengine.optim import build_optim_wrapper

    wrapper = build_optim_wrapper(model, dict(
        type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05),
        constructor="DetectorLayerDecayOptimizerConstructor",
        paramwise_cfg=dict(decay_rate=0.95, decay_type="layer_wise", num_layers=6)))
    lrs = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in wrapper.optimizer.param_groups:
        for p in g["params"]:
            lrs[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert lrs["detector.backbone.body.downsample_layers.0.0.weight"] == (pytest.approx(1e-4 * 0.95 ** 7), 0.05)
    assert lrs["detector.backbone.body.stages.2.1.pwconv1.weight"] == (pytest.approx(1e-4 * 0.95 ** 4), 0.05)
    assert lrs["detector.backbone.body.stages.3.0.pwconv1.bias"] == (pytest.approx(1e-4 * 0.95 ** 1), 0.0)
    assert lrs["detector.roi_heads.box_head.fc6.weight"] == (pytest.approx(1e-4), 0.05)
    assert lrs["detector.backbone.fpn.inner_blocks.0.0.bias"] == (pytest.approx(1e-4), 0.0)
    assert len(lrs) == sum(1 for _ in model.parameters())
    with pytest.raises(ValueError, match="num_layers"):
        DetectorLayerDecayOptimizerConstructor(
            dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4)),
            paramwise_cfg=dict(decay_rate=0.95)).add_params([], model)
    with pytest.raises(ValueError, match="builder"):
        TorchvisionDetector(builder="retinanet")
