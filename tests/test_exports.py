"""The backbone under torch.compile, torch._dynamo.explain, torch.fx / torchvision's
create_feature_extractor and ONNX export (onnxruntime), each against eager outputs.

Sizes that are not multiples of 32 go through the pad-then-crop helpers; they are
`torch.fx.wrap`ped leaves in modeling.py and branch-free so export keeps them dynamic.
"""
import warnings

import pytest
import torch

from convnext_backbone import ConvNextBackbone, ConvNextConfig

STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]
# (batch, height, width): a multiple of 32 and two that need padding and cropping.
SHAPES = [(2, 64, 64), (1, 50, 70), (3, 33, 97)]
# Concrete values for the flag arguments: symbolic tracing cannot branch on proxies.
FX_CONCRETE = {"output_hidden_states": None, "return_dict": None}


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], out_indices=[0, 1, 2, 3, 4])
    model = ConvNextBackbone(cfg).eval()
    # Non-trivial layer scale / out norms, so a wrong or skipped op shows in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def _inputs(shape, seed=0):
    return torch.randn(shape[0], 3, shape[1], shape[2], generator=torch.Generator().manual_seed(seed))


def _expected_shapes(shape):
    b, h, w = shape
    return [(b, c, -(-h // s), -(-w // s)) for c, s in zip([8, 8, 16, 32, 64], [4, 4, 8, 16, 32])]


def _max_diff(outs, refs):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert tuple(o.shape) == tuple(r.shape)
    return max(float((torch.as_tensor(o) - r).abs().max()) for o, r in zip(outs, refs))


@torch.no_grad()
def _eager(model, x):
    maps = model(x).feature_maps
    assert [tuple(m.shape) for m in maps] == _expected_shapes((x.shape[0], x.shape[2], x.shape[3]))
    return maps


# --- torch.compile / dynamo ----------------------------------------------------------
@pytest.mark.parametrize("return_dict", [True, False])
@pytest.mark.parametrize("output_hidden_states", [False, True])
def test_dynamo_explain_no_graph_breaks(backbone, return_dict, output_hidden_states):
    import torch._dynamo

    torch._dynamo.reset()
    x = _inputs(SHAPES[1])
    with torch.no_grad():
        explanation = torch._dynamo.explain(backbone)(x, output_hidden_states=output_hidden_states,
                                                      return_dict=return_dict)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("return_dict", [True, False])
def test_compile_aot_eager_matches_eager(backbone, return_dict):
    # The second size makes dynamo recompile with symbolic H, W (automatic dynamic shapes),
    # which runs the pad/crop arithmetic on SymInts. ~30 s on two shared cores.
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(backbone, backend="aot_eager")
    for i, shape in enumerate(SHAPES[:2]):
        x = _inputs(shape, seed=i)
        with torch.no_grad():
            out = compiled(x, return_dict=return_dict)
        maps = out.feature_maps if return_dict else out[0]
        assert _max_diff(maps, _eager(backbone, x)) <= 1e-5


@pytest.mark.slow
def test_compile_inductor_matches_eager(backbone):
    # Inductor on CPU generates and builds C++: ~40 s on two shared cores, hence slow.
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(backbone, backend="inductor")
    x = _inputs(SHAPES[1])
    with torch.no_grad():
        maps = compiled(x).feature_maps
    assert _max_diff(maps, _eager(backbone, x)) <= 1e-5


# --- torch.fx / torchvision feature extraction --------------------------------------
def test_fx_symbolic_trace_matches_eager(backbone):
    traced = torch.fx.symbolic_trace(backbone, concrete_args=FX_CONCRETE)
    called = {n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"}
    # Padding and cropping are recorded as leaf calls, so the trace is not tied to one size.
    assert {"_check_pixel_values", "_pad_to_multiple", "_crop_to_stride"} <= called
    for i, shape in enumerate(SHAPES):
        x = _inputs(shape, seed=i)
        with torch.no_grad():
            out = traced(x)
        assert _max_diff(out["feature_maps"], _eager(backbone, x)) <= 1e-5  # same ops; kernels may differ in the last bit


def test_fx_trace_tuple_output_with_hidden_states(backbone):
    traced = torch.fx.symbolic_trace(backbone, concrete_args={"output_hidden_states": True,
                                                              "return_dict": False})
    x = _inputs(SHAPES[2])
    with torch.no_grad():
        maps, hidden = traced(x, True, False)
        ref = backbone(x, output_hidden_states=True)
    assert _max_diff(maps, ref.feature_maps) <= 1e-5  # same ops; kernels may differ in the last bit
    assert _max_diff(hidden, ref.hidden_states) <= 1e-5  # same ops; kernels may differ in the last bit


def test_create_feature_extractor_matches_eager(backbone):
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    # The per-stage out norms' outputs are the backbone's feature maps.
    return_nodes = {backbone.out_norm_name(name): name for name in STAGES}
    extractor = feature_extraction.create_feature_extractor(backbone, return_nodes=return_nodes,
                                                            concrete_args=FX_CONCRETE)
    for i, shape in enumerate(SHAPES):
        x = _inputs(shape, seed=i)
        with torch.no_grad():
            feats = extractor(x)
        assert list(feats) == STAGES
        assert _max_diff(list(feats.values()), _eager(backbone, x)) <= 1e-5  # same ops; kernels may differ in the last bit
    # Raw (un-normed) stage outputs through their crop nodes equal hidden_states.
    crops = {"_crop_to_stride_1": "stage1", "_crop_to_stride_4": "stage4"}
    raw = feature_extraction.create_feature_extractor(backbone, return_nodes=crops, concrete_args=FX_CONCRETE)
    x = _inputs(SHAPES[1])
    with torch.no_grad():
        hidden = backbone(x, output_hidden_states=True).hidden_states
        feats = raw(x)
    assert _max_diff([feats["stage1"], feats["stage4"]], [hidden[1], hidden[4]]) <= 1e-5  # same ops; kernels may differ in the last bit


# --- ONNX --------------------------------------------------------------------------
class _FeatureMaps(torch.nn.Module):
    """Tuple-of-tensors wrapper: exporters want tensors out, not a dict."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        return self.model(pixel_values, return_dict=False)[0]


def _run_onnx(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


@pytest.mark.slow
def test_onnx_dynamo_export_dynamic_shapes(backbone, tmp_path):
    # ~25 s: torch.export + onnxscript translation + optimisation.
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "backbone.onnx"
    dim = torch.export.Dim.DYNAMIC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_FeatureMaps(backbone), (_inputs(SHAPES[1]),), str(path), dynamo=True,
                          input_names=["pixel_values"],
                          output_names=[f"feature_map_{s}" for s in STAGES],
                          dynamic_shapes={"pixel_values": {0: dim, 2: dim, 3: dim}})
    # One graph serves every batch size and every input size, padded or not.
    for i, shape in enumerate(SHAPES):
        x = _inputs(shape, seed=10 + i)
        assert _max_diff(_run_onnx(path, x), _eager(backbone, x)) <= 1e-4


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
def test_onnx_torchscript_export_static_shape(backbone, tmp_path, shape):
    # The TorchScript exporter records Python-int sizes as constants, so its graph is
    # valid for the traced input size only (use dynamo=True for dynamic H, W).
    pytest.importorskip("onnxruntime")
    path = tmp_path / "backbone.onnx"
    x = _inputs(shape, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_FeatureMaps(backbone), (x,), str(path), dynamo=False, input_names=["pixel_values"])
    assert _max_diff(_run_onnx(path, x), _eager(backbone, x)) <= 1e-4
