"""End to end: tools/train.py + tools/test.py on a generated COCO dataset (mmengine Runner,
torchvision Mask R-CNN on ConvNeXt, pycocotools COCOeval), kill + resume, 2-process DDP."""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("mmengine")
pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_tiny_coco import make_tiny_coco  # noqa: E402

DEMO_CONFIG = os.path.join(ROOT, "configs", "convnext", "convnext-demo_mask-rcnn_fpn_1xb4-300it_tiny-shapes-128.py")
# Box AP on the validation split after TRAIN_ITERS iterations. A real run (seed 0, 64
# training images, 2 CPU threads, torch 2.11) reached box AP 0.407 / mask AP 0.567; the
# threshold leaves a margin for run-to-run and platform differences while staying far above
# an untrained model (0.0).
TRAIN_ITERS = 80
BOX_AP_THRESHOLD = 0.25


def _env(threads: int = 2):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def _run(args, timeout, threads=2):
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=_env(threads), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_coco"))
    return make_tiny_coco(root, num_train=64, num_val=16, size=128, seed=0)


def _config(tmp_path, data, iters, val_interval, ckpt_interval, name="cfg.py"):
    root = data["root"].rstrip("/") + "/"
    text = f"""
_base_ = [{DEMO_CONFIG!r}]
data_root = {root!r}
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
val_evaluator = dict(data_root=data_root)
test_evaluator = dict(data_root=data_root)
train_cfg = dict(max_iters={iters}, val_interval={val_interval})
param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=min(40, {iters}))]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval={ckpt_interval}, max_keep_ckpts=10))
"""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _metrics_line(output):
    lines = [l for l in output.splitlines() if l.startswith("METRICS ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("METRICS "):])


@pytest.mark.slow
def test_train_learns_then_tools_test_reports_cocoeval(data, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cfg = _config(tmp_path, data, TRAIN_ITERS, TRAIN_ITERS, TRAIN_ITERS)
    work = tmp_path / "train"
    out = _run(["tools/train.py", cfg, "--work-dir", str(work)], timeout=900)
    assert f"Iter(train) [{TRAIN_ITERS}/{TRAIN_ITERS}]" in out
    ckpt = work / f"iter_{TRAIN_ITERS}.pth"
    assert ckpt.is_file()

    test_dir = tmp_path / "test"
    out = _run(["tools/test.py", cfg, str(ckpt), "--work-dir", str(test_dir),
                "--out-json", str(tmp_path / "metrics.json")], timeout=600)
    metrics = _metrics_line(out)
    print("tools/test.py metrics:", metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    keys = {f"coco/{m}_{s}" for m in ("bbox", "segm") for s in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")}
    assert set(metrics) == keys
    assert metrics["coco/bbox_mAP"] >= BOX_AP_THRESHOLD, metrics
    assert metrics["coco/segm_mAP"] > 0.1, metrics

    # The numbers are pycocotools': re-score the COCO-format results JSON that test.py wrote.
    results = glob.glob(str(test_dir / "*" / "coco_results.bbox.json"))
    assert len(results) == 1 and os.path.isfile(results[0].replace(".bbox.", ".segm."))
    gt = COCO(data["val_ann"])
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(results[0].replace(".bbox.", f".{iou_type}.")), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert metrics[f"coco/{iou_type}_mAP"] == pytest.approx(ev.stats[0], abs=1e-4)
        assert metrics[f"coco/{iou_type}_mAP_50"] == pytest.approx(ev.stats[1], abs=1e-4)


def _logged_iters(text):
    return [int(m) for m in re.findall(r"Iter\(train\) \[\s*(\d+)/", text)]


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_end(data, tmp_path):
    iters = 12
    cfg = _config(tmp_path, data, iters, 1000, 4)
    work = tmp_path / "work"
    cmd = [sys.executable, "tools/train.py", cfg, "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (work / "iter_4.pth").exists():
            assert proc.poll() is None, "training ended before the first checkpoint"
            assert time.time() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (work / f"iter_{iters}.pth").exists()
    # The newest checkpoint, even if the kill came before mmengine's `last_checkpoint`
    # pointer (written after it) named it.
    resumed_from = max(int(re.search(r"iter_(\d+)\.pth$", p.name).group(1))
                       for p in work.glob("iter_*.pth"))
    assert resumed_from in (4, 8)

    out = _run(["tools/train.py", cfg, "--work-dir", str(work), "--resume"], timeout=600)
    assert "resumed" in out.lower(), out[-3000:]
    logged = _logged_iters(out)
    assert logged[0] == resumed_from + 1 and logged[-1] == iters
    assert (work / f"iter_{iters}.pth").is_file()

    import torch

    from convnext_backbone.mmengine_utils import enable_safe_resume

    enable_safe_resume()
    ckpt = torch.load(work / f"iter_{iters}.pth", map_location="cpu", weights_only=True)
    assert ckpt["meta"]["iter"] == iters


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo(data, tmp_path):
    iters = 3
    cfg = _config(tmp_path, data, iters, iters, iters)  # validates at the end, across both ranks
    work = tmp_path / "ddp"
    out = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "tools/train.py", cfg, "--launcher", "pytorch", "--work-dir", str(work)], timeout=600, threads=1)
    logs = glob.glob(str(work / "*" / "*.log"))
    assert len(logs) == 1
    text = open(logs[0]).read()
    # mmengine's environment report: "GPU number" is its name for the world size
    assert "Distributed launcher: pytorch" in text and "Distributed training: True" in text
    assert "GPU number: 2" in text
    assert _logged_iters(text)[-1] == iters
    assert (work / f"iter_{iters}.pth").is_file()
    # COCOeval ran once, on the predictions gathered from both ranks (all 16 images)
    assert "coco/bbox_mAP" in text and "Iter(val) [2/2]" in text  # 16 images, 2 ranks, batch 4
    assert "COCOeval on 16 images" in text
    written = glob.glob(str(work / "*" / "coco_results.bbox.json"))
    assert len(written) == 1
    assert {r["image_id"] for r in json.load(open(written[0]))} <= set(range(1000, 1016))
