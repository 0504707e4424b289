"""convnext_backbone.mmengine_utils: mmengine checkpoints load with weights_only=True through
an exact allow-list, and checkpoint writes are atomic. Needs mmengine only (not mmcv)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("mmengine")


def _pickled_globals(path: str) -> set:
    """Every global a torch zip checkpoint's pickle names (independent of allow-lists)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    names = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            names.add(f"{'builtins' if module == '__builtin__' else module}.{name}")
    return names


def test_safe_globals_are_exactly_what_mmengine_writes(tmp_path):
    """Builds a real Runner checkpoint and checks the allow-list against its globals."""
    from mmengine.runner import Runner

    from convnext_backbone.mmengine_utils import enable_safe_resume, safe_globals

    from mmengine.model import BaseModel

    class ToyModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x, mode="loss"):
            x = torch.stack(x) if isinstance(x, (list, tuple)) else x
            return dict(loss=self.lin(x).square().mean())

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return dict(x=torch.full((2,), float(i)))

    runner = Runner(model=ToyModel(), work_dir=str(tmp_path),
                    train_dataloader=dict(dataset=Data(), sampler=dict(type="InfiniteSampler"),
                                          batch_size=2, collate_fn=dict(type="default_collate")),
                    optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
                    train_cfg=dict(by_epoch=False, max_iters=2),
                    param_scheduler=[dict(type="PolyLR", by_epoch=False, begin=0, end=2)],
                    default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False,
                                                       interval=2)))
    runner.train()
    path = str(tmp_path / "iter_2.pth")
    needed = _pickled_globals(path)
    allowed = set()
    for g in safe_globals():
        allowed.add(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    # torch rebuild functions, OrderedDict and _codecs.encode (bytes) are allowed by torch itself
    assert {n for n in needed if not n.startswith(("torch.", "collections.", "_codecs."))} <= allowed
    assert {"builtins.getattr", "mmengine.logging.history_buffer.HistoryBuffer"} <= needed
    enable_safe_resume()
    ckpt = torch.load(path)  # weights_only=True (the default) stays on
    assert ckpt["meta"]["iter"] == 2
    # the stand-in getattr resolves nothing but HistoryBuffer's methods
    import builtins
    import io

    import numpy as np

    class Evil:
        def __reduce__(self):
            return (builtins.getattr, (np.ndarray, "tofile"))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="only .* of HistoryBuffer are allowed"):
        torch.load(buf)


def test_atomic_checkpoint_writes(tmp_path):
    from mmengine.fileio.backends.local_backend import LocalBackend

    from convnext_backbone.mmengine_utils import enable_atomic_checkpoints

    enable_atomic_checkpoints()
    target = tmp_path / "iter_10.pth"
    backend = LocalBackend()
    backend.put(b"complete checkpoint", str(target))
    assert target.read_bytes() == b"complete checkpoint"

    # A write that fails after the file was opened (as a killed or crashing process would):
    # mmengine's own put() would already have truncated the target at this point.
    with pytest.raises(TypeError):
        backend.put("not bytes", str(target))
    assert target.read_bytes() == b"complete checkpoint"  # the old file is intact
    backend.put_text("iter_10.pth", str(tmp_path / "last_checkpoint"))
    assert sorted(os.listdir(tmp_path)) == ["iter_10.pth", "last_checkpoint"]  # no temp files


def test_latest_checkpoint_does_not_trust_a_lagging_pointer(tmp_path):
    """`--resume` continues from the newest checkpoint present, even when the run was killed
    after writing it but before mmengine's `last_checkpoint` pointer named it."""
    from convnext_backbone.mmengine_utils import latest_checkpoint

    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "elsewhere.pth"))
    assert latest_checkpoint(tmp_path) == str(tmp_path / "elsewhere.pth")  # only the pointer
    for n in (4, 12, 8):  # numeric, not lexical, order
        (tmp_path / f"iter_{n}.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_8.pth"))
    (tmp_path / "best_mIoU_iter_20.pth").write_bytes(b"x")  # not a resume point
    assert latest_checkpoint(tmp_path) == str(tmp_path / "iter_12.pth")


def test_runner_args_and_config_loading_shared_by_the_tools(tmp_path, monkeypatch):
    """tools/train.py and tools/test.py parse the same runner options and load configs the
    same way: --cfg-options merged, the work dir given or ./work_dirs/CONFIG_NAME, the
    launcher recorded, --local-rank exported as LOCAL_RANK only where it is unset."""
    import argparse

    from convnext_backbone.mmengine_utils import (add_runner_args, finish_runner_args,
                                                  load_config)

    cfg_file = tmp_path / "my_exp.py"
    cfg_file.write_text("train_cfg = dict(max_iters=10)\nwork_dir = None\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    add_runner_args(parser)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = finish_runner_args(parser.parse_args(
        [str(cfg_file), "--cfg-options", "train_cfg.max_iters=3", "--local-rank", "2"]))
    assert os.environ["LOCAL_RANK"] == "2"
    cfg = load_config(args)
    assert cfg.train_cfg.max_iters == 3 and cfg.launcher == "none"
    assert cfg.work_dir == os.path.join("./work_dirs", "my_exp")
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's value wins over --local-rank
    args = finish_runner_args(parser.parse_args(
        [str(cfg_file), "--work-dir", str(tmp_path / "w"), "--launcher", "pytorch",
         "--local-rank", "5"]))
    assert os.environ["LOCAL_RANK"] == "0"
    cfg = load_config(args)
    assert cfg.work_dir == str(tmp_path / "w") and cfg.launcher == "pytorch"
    with pytest.raises(SystemExit):  # argparse names the valid launchers
        parser.parse_args([str(cfg_file), "--launcher", "k8s"])
