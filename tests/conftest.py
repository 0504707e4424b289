import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests are deterministic and CPU-bound on small machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_config():
    from convnext_backbone import ConvNextConfig

    return ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1])


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """A list that grows by one per torch.utils.checkpoint.checkpoint call: tests of
    gradient checkpointing assert it really ran (equal results alone would also pass if
    checkpointing were silently off)."""
    import torch.utils.checkpoint

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls
