"""ConvNextImageProcessor: bit-exact parity with transformers' PIL-based ConvNeXt
processor (`ConvNextImageProcessorPil` in transformers 5.x, the class that resizes through
PIL like the 4.x `ConvNextImageProcessor`), serialisation both ways, and error paths."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

PIL_Image = pytest.importorskip("PIL.Image")
tf_convnext = pytest.importorskip("transformers.models.convnext.image_processing_pil_convnext")

from convnext_backbone.image_processing import (BatchFeature, ConvNextFeatureExtractor,  # noqa: E402
                                                ConvNextImageProcessor)

RefProcessor = tf_convnext.ConvNextImageProcessorPil
BILINEAR, BICUBIC = PIL_Image.Resampling.BILINEAR, PIL_Image.Resampling.BICUBIC

# (height, width): portrait, landscape, square, tiny, odd, extreme aspect ratios.
SIZES = [(30, 40), (41, 17), (224, 224), (500, 333), (7, 9), (5, 61), (383, 385), (256, 255)]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _uint8_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return _rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _assert_same(ours, ref) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    # Same PIL resize, same float64->float32 rescale, same float32 normalise: exact.
    np.testing.assert_array_equal(ours, ref)


# --- parity ---------------------------------------------------------------------------
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("shortest_edge", [224, 100, 384, 512])
def test_parity_sizes_regimes_crop_pct_resample(hw, shortest_edge):
    image = _uint8_image(*hw, seed=hw[0] * 1000 + hw[1])
    for crop_pct in (224 / 256, 1.0, 0.95, 0.5, 1.25):  # 1.25: resized smaller than crop -> zero pad
        for resample in (BILINEAR, BICUBIC, 0, 1):
            kwargs = dict(size={"shortest_edge": shortest_edge}, crop_pct=crop_pct, resample=resample)
            ref = RefProcessor(**kwargs)(image, return_tensors="np", input_data_format="channels_last")
            ours = ConvNextImageProcessor(**kwargs)(image, return_tensors="np",
                                                    input_data_format="channels_last")
            assert ours.pixel_values.shape == (1, 3, shortest_edge, shortest_edge)
            _assert_same(ours.pixel_values, ref.pixel_values)


def test_parity_defaults_and_call_overrides():
    image = _uint8_image(301, 203, seed=3)
    ours = ConvNextImageProcessor()
    # The documented default resample is BILINEAR (transformers 4.x); 5.x's class default is
    # BICUBIC, so the reference is given it explicitly.
    ref = RefProcessor(resample=BILINEAR)
    _assert_same(ours(image, return_tensors="np").pixel_values,
                 ref(image, return_tensors="np").pixel_values)
    overrides = dict(size={"shortest_edge": 160}, crop_pct=0.9, resample=BICUBIC,
                     rescale_factor=1 / 127.5, image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7])
    _assert_same(ours.preprocess(image, return_tensors="np", **overrides).pixel_values,
                 ref.preprocess(image, return_tensors="np", **overrides).pixel_values)


@pytest.mark.parametrize("kind", ["pil", "np_hwc", "np_chw", "pt_chw", "pt_hwc", "np_float01",
                                  "np_float_int_valued", "pt_float01_chw", "np_gray_2d"])
@pytest.mark.parametrize("shortest_edge", [224, 384])
def test_parity_input_types(kind, shortest_edge):
    hwc = _uint8_image(57, 83, seed=11)
    images = {
        "pil": PIL_Image.fromarray(hwc),
        "np_hwc": hwc,
        "np_chw": hwc.transpose(2, 0, 1).copy(),
        "pt_chw": torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),
        "pt_hwc": torch.from_numpy(hwc),
        "np_float01": _rng(5).random((57, 83, 3)).astype(np.float32),
        "np_float_int_valued": hwc.astype(np.float32),
        "pt_float01_chw": torch.rand(3, 57, 83, generator=torch.Generator().manual_seed(0)),
        "np_gray_2d": hwc[..., 0],
    }
    image = images[kind]
    kwargs = dict(size={"shortest_edge": shortest_edge}, resample=BICUBIC)
    if kind == "np_gray_2d":  # one channel: normalise with one mean/std
        kwargs.update(image_mean=[0.5], image_std=[0.5])
    # transformers rejects 2-D arrays; its reference is the same pixels as (H, W, 1).
    ref_image = image[..., None] if kind == "np_gray_2d" else image
    ref = RefProcessor(**kwargs)(ref_image, return_tensors="np")
    ours = ConvNextImageProcessor(**kwargs)(image, return_tensors="np")
    _assert_same(ours.pixel_values, ref.pixel_values)


def test_pil_numpy_tensor_inputs_agree():
    hwc = _uint8_image(90, 61, seed=2)
    proc = ConvNextImageProcessor(size={"shortest_edge": 224})
    outs = [proc(x, return_tensors="pt").pixel_values
            for x in (PIL_Image.fromarray(hwc), hwc, torch.from_numpy(hwc).permute(2, 0, 1))]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("flags", [dict(do_resize=False), dict(do_rescale=False),
                                   dict(do_normalize=False), dict(do_rescale=False, do_normalize=False),
                                   dict(do_resize=False, do_rescale=False, do_normalize=False)])
def test_parity_switched_off_steps(flags):
    image = _uint8_image(45, 38, seed=7)
    ref = RefProcessor(size={"shortest_edge": 224}, resample=BILINEAR, **flags)(image, return_tensors="np")
    ours = ConvNextImageProcessor(size={"shortest_edge": 224}, **flags)(image, return_tensors="np")
    _assert_same(ours.pixel_values, ref.pixel_values)


def test_parity_batches():
    images = [_uint8_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    kwargs = dict(size={"shortest_edge": 224}, resample=BICUBIC)
    ref = RefProcessor(**kwargs)(images, return_tensors="pt").pixel_values
    ours = ConvNextImageProcessor(**kwargs)(images, return_tensors="pt").pixel_values
    assert ours.shape == (len(SIZES), 3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    # A batch equals its images processed one at a time.
    proc = ConvNextImageProcessor(**kwargs)
    for i, image in enumerate(images):
        assert torch.equal(proc(image, return_tensors="pt").pixel_values[0], ours[i])
    # 4-D numpy / torch batches and nested lists.
    stack = np.stack([_uint8_image(40, 50, seed=s) for s in range(3)])
    ref4 = RefProcessor(**kwargs)(stack, return_tensors="np").pixel_values
    _assert_same(proc(stack, return_tensors="np").pixel_values, ref4)
    _assert_same(proc(torch.from_numpy(stack), return_tensors="np").pixel_values, ref4)
    _assert_same(proc([list(stack[:2]), [stack[2]]], return_tensors="np").pixel_values, ref4)


def test_parity_convert_rgb():
    hwc = _uint8_image(33, 47, seed=4, channels=4)
    rgba = PIL_Image.fromarray(hwc, mode="RGBA")
    gray = PIL_Image.fromarray(hwc[..., 0], mode="L")
    for image in (rgba, gray, hwc, hwc[..., :1]):
        ref = RefProcessor(size={"shortest_edge": 224}, resample=BILINEAR)(image, do_convert_rgb=True, return_tensors="np")
        ours = ConvNextImageProcessor(size={"shortest_edge": 224})(image, do_convert_rgb=True,
                                                                   return_tensors="np")
        assert ours.pixel_values.shape == (1, 3, 224, 224)
        _assert_same(ours.pixel_values, ref.pixel_values)


# --- output formats ------------------------------------------------------------------
def test_return_tensors_and_data_format():
    images = [_uint8_image(60, 80, seed=1), _uint8_image(80, 60, seed=2)]
    proc = ConvNextImageProcessor(size={"shortest_edge": 64})
    as_list = proc(images)
    assert isinstance(as_list, BatchFeature) and isinstance(as_list.pixel_values, list)
    assert as_list["pixel_values"] is as_list.pixel_values
    assert all(isinstance(a, np.ndarray) and a.shape == (3, 64, 64) and a.dtype == np.float32
               for a in as_list.pixel_values)
    as_np = proc(images, return_tensors="np").pixel_values
    assert isinstance(as_np, np.ndarray) and as_np.shape == (2, 3, 64, 64)
    as_pt = proc(images, return_tensors="pt").pixel_values
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(np.stack(as_list.pixel_values), as_np)
    np.testing.assert_array_equal(as_pt.numpy(), as_np)
    # channels_last is the channels_first result transposed (transformers 5.x's PIL backend
    # ignores data_format and always returns channels_first, so the reference is transposed).
    last = proc(images, return_tensors="pt", data_format="channels_last").pixel_values
    assert last.shape == (2, 64, 64, 3)
    assert torch.equal(last, as_pt.permute(0, 2, 3, 1))
    ref = RefProcessor(size={"shortest_edge": 64}, resample=BILINEAR)(images, return_tensors="pt")
    assert torch.equal(last, ref.pixel_values.permute(0, 2, 3, 1))
    assert proc(images, return_tensors="pt").to(torch.float64).pixel_values.dtype == torch.float64


def test_default_values_and_hand_computed_output():
    proc = ConvNextImageProcessor()
    assert proc.do_resize and proc.do_rescale and proc.do_normalize
    assert proc.size == {"shortest_edge": 384}
    assert proc.crop_pct == 224 / 256
    assert proc.resample == BILINEAR
    assert proc.rescale_factor == 1 / 255
    assert list(proc.image_mean) == [0.5, 0.5, 0.5] and list(proc.image_std) == [0.5, 0.5, 0.5]
    # A constant image stays constant through any resize: 255 -> +1, 0 -> -1, 51 -> -0.6.
    for value, expected in ((255, 1.0), (0, -1.0), (51, 51 / 255 / 0.5 - 1)):
        image = np.full((300, 200, 3), value, dtype=np.uint8)
        for size in (224, 384):
            out = proc(image, size={"shortest_edge": size}, return_tensors="np").pixel_values
            assert out.shape == (1, 3, size, size)
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_resize_geometry():
    proc = ConvNextImageProcessor(do_rescale=False, do_normalize=False)
    # 224 < 384: short side -> int(224 / 0.875) = 256, long side int(256 * 300 / 200) = 384,
    # then a centred 224 crop starting at ((384 - 224) // 2, (256 - 224) // 2) = (80, 16).
    ramp = _uint8_image(300, 200, seed=12)
    resized = proc.resize(ramp.transpose(2, 0, 1), {"shortest_edge": 224}, 224 / 256, BILINEAR)
    assert resized.shape == (3, 224, 224)
    full = np.array(PIL_Image.fromarray(ramp).resize((256, 384), BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(resized, full[:, 80:304, 16:240])
    # >= 384 warps to a square, no crop.
    warped = proc.resize(ramp.transpose(2, 0, 1), {"shortest_edge": 400}, 224 / 256, BILINEAR)
    np.testing.assert_array_equal(
        warped, np.array(PIL_Image.fromarray(ramp).resize((400, 400), BILINEAR)).transpose(2, 0, 1))


# --- serialisation -------------------------------------------------------------------
def test_save_pretrained_read_by_transformers(tmp_path):
    proc = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.9, resample=BICUBIC,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    path = proc.save_pretrained(tmp_path)
    assert os.path.basename(path) == "preprocessor_config.json"
    stored = json.loads(open(path).read())
    assert stored["size"] == {"shortest_edge": 224} and stored["resample"] == 3
    assert stored["crop_pct"] == 0.9 and stored["image_processor_type"] == "ConvNextImageProcessor"
    ref = RefProcessor.from_pretrained(str(tmp_path))
    image = _uint8_image(123, 77, seed=9)
    _assert_same(proc(image, return_tensors="np").pixel_values, ref(image, return_tensors="np").pixel_values)
    from transformers import AutoImageProcessor

    auto = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    assert type(auto).__name__.startswith("ConvNextImageProcessor")
    _assert_same(proc(image, return_tensors="np").pixel_values, auto(image, return_tensors="np").pixel_values)
    # Round trip through our own loader.
    again = ConvNextImageProcessor.from_pretrained(tmp_path)
    assert again == proc and again.to_dict() == proc.to_dict()
    assert ConvNextImageProcessor.from_pretrained(path, crop_pct=0.5).crop_pct == 0.5


def test_from_pretrained_reads_transformers_config(tmp_path):
    ref = RefProcessor(size={"shortest_edge": 288}, crop_pct=0.95, resample=BICUBIC, do_convert_rgb=True)
    ref.save_pretrained(str(tmp_path))
    ours = ConvNextImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"shortest_edge": 288} and ours.crop_pct == 0.95
    assert ours.resample == BICUBIC and ours.do_convert_rgb is True
    image = PIL_Image.fromarray(_uint8_image(200, 150, seed=8))
    _assert_same(ours(image, return_tensors="np").pixel_values, ref(image, return_tensors="np").pixel_values)


def test_feature_extractor_alias_and_lazy_import():
    import convnext_backbone

    assert convnext_backbone.ConvNextImageProcessor is ConvNextImageProcessor
    assert issubclass(convnext_backbone.ConvNextFeatureExtractor, ConvNextImageProcessor)
    image = _uint8_image(50, 70, seed=6)
    np.testing.assert_array_equal(ConvNextFeatureExtractor(size={"shortest_edge": 64})(image).pixel_values[0],
                                  ConvNextImageProcessor(size={"shortest_edge": 64})(image).pixel_values[0])
    # The package top level must not pull in PIL (the processor is imported lazily).
    code = "import sys, convnext_backbone; assert 'PIL' not in sys.modules, 'PIL imported'"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- errors --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(size={"height": 224, "width": 224}), "shortest_edge"),
    (dict(size={"shortest_edge": 0}), "shortest_edge"),
    (dict(size={"shortest_edge": 22.5}), "shortest_edge"),
    (dict(size="224"), "shortest_edge"),
    (dict(crop_pct=0), "crop_pct must be a positive float"),
    (dict(crop_pct=-0.5), "crop_pct must be a positive float"),
    (dict(resample=9), r"resample must be .*BICUBIC"),
    (dict(image_mean=[]), "image_mean must be"),
    (dict(image_std=[0.5, 0.0, 0.5]), "image_std must not contain zeros"),
    (dict(do_resize="yes"), "do_resize must be True or False"),
    (dict(rescale_factor="1/255"), "rescale_factor must be"),
    (dict(crop_size={"height": 224}), r"Unknown ConvNextImageProcessor argument.*crop_size"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvNextImageProcessor(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda p, im: p(im, return_tensors="tf"), r"return_tensors must be one of None .*'np' or 'pt'"),
    (lambda p, im: p(im, data_format="NHWC"), "data_format must be one of 'channels_first', 'channels_last'"),
    (lambda p, im: p(im, input_data_format="hwc"), "input_data_format must be one of None"),
    (lambda p, im: p(im, size={"longest_edge": 10}), "shortest_edge"),
    (lambda p, im: p(im, do_center_crop=True), r"Unknown preprocess argument.*valid"),
    (lambda p, im: p(np.zeros((1, 2, 3, 4, 5), np.uint8)), "2-D, 3-D or a 4-D batch"),
    (lambda p, im: p(np.zeros((5,), np.uint8)), "2-D, 3-D or a 4-D batch"),
    (lambda p, im: p([np.zeros((1, 2, 3, 4, 5), np.uint8)]), r"2-D \(H, W\) or 3-D"),
    (lambda p, im: p([]), "images is empty"),
    (lambda p, im: p("cat.jpg"), "Unsupported images type str"),
    (lambda p, im: p([im, "cat.jpg"]), "Unsupported image type str"),
    (lambda p, im: p(np.zeros((20, 30, 5), np.uint8)), "Cannot infer the channel dimension"),
    (lambda p, im: p(np.zeros((20, 30, 3), np.bool_)), "integer .* or float dtype"),
    (lambda p, im: p(im.astype(np.float32) * 3.7), r"must lie in \[0, 1\]"),
    (lambda p, im: p(im[..., :1]), "pass do_convert_rgb=True"),
    (lambda p, im: p([im, im[:10]], do_resize=False, return_tensors="pt"), "Cannot stack images"),
    (lambda p, im: p(im, size={"shortest_edge": 2}, crop_pct=5.0), "Resize target must be positive"),
])
def test_call_errors(call, match):
    proc = ConvNextImageProcessor(size={"shortest_edge": 32})
    with pytest.raises(ValueError, match=match):
        call(proc, _uint8_image(20, 30))


def test_from_pretrained_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ConvNextImageProcessor.from_pretrained(tmp_path / "nowhere")


def test_unknown_keys_in_config_are_ignored_with_warning(tmp_path, caplog):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
         "image_processor_type": "ConvNextImageProcessor", "resample": 3}))
    with caplog.at_level("WARNING"):
        proc = ConvNextImageProcessor.from_pretrained(tmp_path)
    assert proc.size == {"shortest_edge": 224} and proc.resample == BICUBIC
    assert "crop_size" in caplog.text
