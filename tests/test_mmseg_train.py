"""Real training through tools/train.py and tools/test.py on the tiny ADE20K-format dataset:
learning (mIoU threshold), SIGKILL + --resume (weights_only stays on), 2-process DDP
(gloo) through torchrun."""
from __future__ import annotations

import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("mmseg", reason="needs mmsegmentation with compiled mmcv ops")
pytestmark = pytest.mark.mmseg

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, "tools"))
from make_tiny_ade20k import make_dataset  # noqa: E402

DEMO = osp.join(REPO, "configs", "convnext", "convnext-demo_upernet_1xb8-1000it_tiny-ade20k-128x128.py")
# Set from real runs of the demo config (1000 iterations, 48 training images at 128x128, seed 0):
# validation mIoU 92.34 (this test and tools/demo_segmentation.py; 69.7 / 73.6 / 85.0 at
# iterations 250 / 500 / 750). After 300 iterations runs were at ~55 (two of the five classes
# not found yet) and predicting "wall" everywhere scores ~15, so 80 means every class was learned.
MIOU_THRESHOLD = 80.0


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # one thread per process: on 2 shared cores, OpenMP spin-waiting makes 2 threads slower
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _data_options(root: str) -> list:
    return [f"{loader}.dataset.data_root={root}"
            for loader in ("train_dataloader", "val_dataloader", "test_dataloader")]


def _run(args, timeout, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable] + args, cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("tiny_ade")), num_train=16, num_val=4, size=64)


def test_dataset_layout_and_labels(small_data):
    import cv2
    import numpy as np

    for split, prefix, n in (("training", "train", 16), ("validation", "val", 4)):
        imgs = sorted(os.listdir(osp.join(small_data, "images", split)))
        anns = sorted(os.listdir(osp.join(small_data, "annotations", split)))
        assert imgs == [f"ADE_{prefix}_{i:08d}.jpg" for i in range(1, n + 1)]
        assert anns == [f"ADE_{prefix}_{i:08d}.png" for i in range(1, n + 1)]
    label = cv2.imread(osp.join(small_data, "annotations", "training", "ADE_train_00000001.png"),
                       cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint8 and label.shape == (64, 64)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 5}
    from mmseg.datasets import ADE20KDataset

    ds = ADE20KDataset(data_root=small_data, data_prefix=dict(
        img_path="images/training", seg_map_path="annotations/training"), pipeline=[])
    assert len(ds) == 16 and len(ds.metainfo["classes"]) == 150
    assert ds[0]["reduce_zero_label"] is True


@pytest.mark.slow
def test_train_learns_then_test_tool(tmp_path):
    data = make_dataset(str(tmp_path / "data"), num_train=48, num_val=12, size=128)
    work = str(tmp_path / "work")
    iters = 1000  # the demo config's schedule
    start = time.time()
    _run(["tools/train.py", DEMO, "--work-dir", work, "--cfg-options", *_data_options(data),
          f"train_cfg.val_interval={iters}", f"default_hooks.checkpoint.interval={iters}"],
         timeout=900)
    train_s = time.time() - start
    ckpt = osp.join(work, f"iter_{iters}.pth")
    assert osp.isfile(ckpt)
    proc = _run(["tools/test.py", DEMO, ckpt, "--work-dir", str(tmp_path / "test"),
                 "--out-json", str(tmp_path / "m.json"), "--cfg-options", *_data_options(data)],
                timeout=300)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1][len("METRICS "):])
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    print(f"train {train_s:.0f}s, metrics {metrics}")
    assert set(metrics) >= {"aAcc", "mIoU", "mAcc"}
    assert metrics["mIoU"] >= MIOU_THRESHOLD, metrics
    # multi-scale + flip through the config's tta_pipeline
    proc = _run(["tools/test.py", DEMO, ckpt, "--tta", "--work-dir", str(tmp_path / "tta"),
                 "--cfg-options", *_data_options(data)], timeout=300)
    tta = json.loads(proc.stdout.strip().splitlines()[-1][len("METRICS "):])
    assert tta["mIoU"] >= MIOU_THRESHOLD - 10, tta


@pytest.mark.slow
def test_sigkill_then_resume_reaches_final_iteration(tmp_path, small_data):
    work = str(tmp_path / "work")
    opts = ["--cfg-options", *_data_options(small_data), "train_cfg.max_iters=40",
            "train_cfg.val_interval=1000", "param_scheduler.0.end=5",
            "param_scheduler.1.begin=5", "param_scheduler.1.end=40", "train_dataloader.batch_size=4",
            "default_hooks.checkpoint.interval=10", "default_hooks.checkpoint.max_keep_ckpts=10",
            "default_hooks.logger.interval=5"]
    cmd = [sys.executable, "tools/train.py", DEMO, "--work-dir", work] + opts
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not osp.exists(osp.join(work, "iter_20.pth")):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not osp.exists(osp.join(work, "iter_40.pth"))
    # (the pointer may still name iter_10 if the kill came between the two writes)
    last = open(osp.join(work, "last_checkpoint")).read().strip()
    assert osp.basename(last) in ("iter_10.pth", "iter_20.pth")

    out = _run(["tools/train.py", DEMO, "--work-dir", work, "--resume"] + opts, timeout=600)
    log = out.stdout + out.stderr
    assert "resumed" in log.lower()
    assert f"Load checkpoint from {last}" in log
    from convnext_backbone.mmengine_utils import enable_safe_resume

    enable_safe_resume()
    final = torch.load(osp.join(work, "iter_40.pth"))  # weights_only=True
    assert final["meta"]["iter"] == 40
    assert open(osp.join(work, "last_checkpoint")).read().strip().endswith("iter_40.pth")
    # the resumed run started from the checkpoint, not from scratch: no iteration 5 logged again
    resumed_iters = [int(line.split("Iter(train) [")[1].split("/")[0])
                     for line in log.splitlines() if "Iter(train) [" in line]
    assert resumed_iters and min(resumed_iters) > int(last.split("iter_")[-1].split(".")[0])


@pytest.mark.slow
def test_two_process_ddp_gloo_torchrun(tmp_path, small_data):
    work = str(tmp_path / "work")
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    port = str(29500 + os.getpid() % 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "tools/train.py", DEMO, "--launcher", "pytorch", "--work-dir", work, "--cfg-options",
         *_data_options(small_data), "train_cfg.max_iters=4", "train_cfg.val_interval=4",
         "param_scheduler.0.end=2", "param_scheduler.1.begin=2", "param_scheduler.1.end=4", "train_dataloader.batch_size=2",
         "default_hooks.checkpoint.interval=4", "default_hooks.logger.interval=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Distributed training: True" in log
    assert "Iter(train) [4/4]" in log and "mIoU" in log
    from convnext_backbone.mmengine_utils import enable_safe_resume

    enable_safe_resume()
    ckpt = torch.load(osp.join(work, "iter_4.pth"), map_location="cpu")  # weights_only=True
    assert ckpt["meta"]["iter"] == 4
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    # Distributed evaluation: both ranks evaluate, rank 0 alone reports and writes the JSON.
    out_json = tmp_path / "ddp_metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={int(port) + 1}", "tools/test.py", DEMO, osp.join(work, "iter_4.pth"),
         "--launcher", "pytorch", "--work-dir", str(tmp_path / "test_work"), "--out-json",
         str(out_json), "--cfg-options", *_data_options(small_data)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert log.count("METRICS {") == 1, log[-3000:]
    assert "mIoU" in json.loads(out_json.read_text())
