"""ConvNeXt image processor with the semantics of transformers' `ConvNextImageProcessor`.

Pipeline (per image): optional RGB conversion -> resize -> [centre crop] -> rescale ->
normalise, all through PIL + numpy exactly as transformers' PIL backend does it, so the
outputs match transformers' slow processor (`ConvNextImageProcessorPil` in transformers
5.x) bit for bit given the same arguments:

* `size["shortest_edge"] >= 384`: warp to a `shortest_edge x shortest_edge` square.
* otherwise: resize the short side to `int(shortest_edge / crop_pct)` keeping the aspect
  ratio (long side `int(new_short * long / short)`), then centre-crop
  `shortest_edge x shortest_edge` (zero padding when the image is smaller).

numpy and PIL are imported here only; `import convnext_backbone` stays torch-only.

Example:
    >>> from convnext_backbone import ConvNextImageProcessor
    >>> processor = ConvNextImageProcessor(size={"shortest_edge": 224})
    >>> processor(PIL.Image.open("cat.jpg"), return_tensors="pt").pixel_values.shape
    torch.Size([1, 3, 224, 224])
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image

from .io_utils import atomic_write_text

__all__ = ["ConvNextImageProcessor", "ConvNextFeatureExtractor", "BatchFeature",
           "IMAGENET_STANDARD_MEAN", "IMAGENET_STANDARD_STD", "IMAGE_PROCESSOR_NAME"]

logger = logging.getLogger(__name__)

# transformers' ConvNeXt processor normalises with the "standard" 0.5 statistics, not the
# ImageNet default (0.485, ...) ones.
IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]
IMAGE_PROCESSOR_NAME = "preprocessor_config.json"

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
_VALID_DATA_FORMATS = (CHANNELS_FIRST, CHANNELS_LAST)
_VALID_RETURN_TENSORS = (None, "np", "pt")
# PIL.Image.Resampling: NEAREST=0, LANCZOS=1, BILINEAR=2, BICUBIC=3, BOX=4, HAMMING=5.
_VALID_RESAMPLE = {int(r): r for r in PIL.Image.Resampling}
# Channel counts an array may have; used to tell CHW from HWC (as transformers does).
_INFERABLE_CHANNELS = (1, 3, 4)
# Keys transformers writes into preprocessor_config.json that configure nothing here.
_METADATA_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class",
                  "_processor_class", "auto_map"}
_PARAM_NAMES = ("do_resize", "size", "crop_pct", "resample", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb")
_CALL_ONLY_NAMES = ("return_tensors", "data_format", "input_data_format")


class BatchFeature(dict):
    """The processor's output: a dict with attribute access (`out.pixel_values`), like
    transformers' `BatchFeature`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no field {name!r}; fields: {sorted(self)}") from None

    def to(self, *args: Any, **kwargs: Any) -> "BatchFeature":
        """`tensor.to(*args, **kwargs)` on every torch tensor (return_tensors="pt")."""
        import torch

        return BatchFeature({k: v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v
                             for k, v in self.items()})


# --- argument validation -----------------------------------------------------------
def _enum_value(value: Any) -> Any:
    # transformers passes str-enums (ChannelDimension, TensorType); accept their values.
    return getattr(value, "value", value)


def _check_size(size: Any) -> Dict[str, int]:
    if isinstance(size, bool):
        size = None  # falls through to the error below
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if (not isinstance(size, dict) or set(size) != {"shortest_edge"}
            or isinstance(size["shortest_edge"], bool) or not isinstance(size["shortest_edge"], int)
            or size["shortest_edge"] <= 0):
        raise ValueError("size must be {'shortest_edge': <positive int>} (or a positive int); >= 384 "
                         "warps to a square, < 384 resizes by crop_pct then centre-crops; "
                         f"got {size!r}")
    return {"shortest_edge": int(size["shortest_edge"])}


def _check_crop_pct(crop_pct: Any) -> float:
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or \
            not math.isfinite(crop_pct) or crop_pct <= 0:
        raise ValueError(f"crop_pct must be a positive float (e.g. 224 / 256 = 0.875), got {crop_pct!r}")
    return float(crop_pct)


def _check_resample(resample: Any) -> "PIL.Image.Resampling":
    value = int(resample) if isinstance(resample, (int, PIL.Image.Resampling)) and \
        not isinstance(resample, bool) else None
    if value not in _VALID_RESAMPLE:
        valid = ", ".join(f"{int(r)} ({r.name})" for r in PIL.Image.Resampling)
        raise ValueError(f"resample must be a PIL.Image.Resampling or one of {valid}; got {resample!r}")
    return _VALID_RESAMPLE[value]


def _check_stats(name: str, value: Any) -> Union[float, Tuple[float, ...]]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values: Tuple[float, ...] = (float(value),)
        out: Union[float, Tuple[float, ...]] = float(value)
    elif isinstance(value, (list, tuple)) and value and \
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        values = tuple(float(v) for v in value)
        out = values
    else:
        raise ValueError(f"{name} must be a float or a non-empty list of floats (one per channel), "
                         f"got {value!r}")
    if name == "image_std" and any(v == 0 for v in values):
        raise ValueError(f"image_std must not contain zeros, got {value!r}")
    return out


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_format(name: str, value: Any, allow_none: bool) -> Optional[str]:
    value = _enum_value(value)
    if value is None and allow_none:
        return None
    if value not in _VALID_DATA_FORMATS:
        valid = ("None, " if allow_none else "") + "'channels_first', 'channels_last'"
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")
    return value


def _check_return_tensors(value: Any) -> Optional[str]:
    value = _enum_value(value)
    if value not in _VALID_RETURN_TENSORS:
        raise ValueError(f"return_tensors must be one of None (list of numpy arrays), 'np' or 'pt'; "
                         f"got {value!r}")
    return value


# --- image helpers (all CHW numpy) -----------------------------------------------------
def _is_torch_tensor(x: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")  # present whenever a tensor can exist
    return torch is not None and isinstance(x, torch.Tensor)


def _is_image(x: Any) -> bool:
    return isinstance(x, (PIL.Image.Image, np.ndarray)) or _is_torch_tensor(x)


def _to_numpy(image: Any) -> np.ndarray:
    if _is_torch_tensor(image):
        import torch

        image = image.detach().cpu()
        if image.dtype == torch.bfloat16:  # numpy has no bfloat16
            image = image.float()
        return image.numpy()
    return image


def _infer_channel_format(image: np.ndarray) -> str:
    first, last = image.shape[0], image.shape[-1]
    if first in _INFERABLE_CHANNELS:
        if last in _INFERABLE_CHANNELS:
            # Same tie-break as transformers: assume channels first.
            logger.warning("Ambiguous channel dimension for image of shape %s; assuming channels_first. "
                           "Pass input_data_format to choose.", tuple(image.shape))
        return CHANNELS_FIRST
    if last in _INFERABLE_CHANNELS:
        return CHANNELS_LAST
    raise ValueError(f"Cannot infer the channel dimension of an image of shape {tuple(image.shape)}: "
                     f"neither the first nor the last axis has {_INFERABLE_CHANNELS} channels; pass "
                     f"input_data_format='channels_first' or 'channels_last'")


def _convert_rgb_pil(image: PIL.Image.Image) -> np.ndarray:
    """HWC uint8 RGB; transparency is composited onto white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.array(PIL.Image.alpha_composite(background, image).convert("RGB"))
    return np.array(image.convert("RGB"))


def _convert_rgb_chw(image: np.ndarray) -> np.ndarray:
    """1 channel -> repeated 3 times; 4 channels -> alpha-composited onto white."""
    num_channels = image.shape[0]
    if num_channels == 1:
        return np.repeat(image, 3, axis=0)
    if num_channels == 4:
        hwc = np.moveaxis(image, 0, -1)
        if np.issubdtype(hwc.dtype, np.floating) and (hwc.min() < 0.0 or hwc.max() > 1.0):
            raise ValueError(f"An RGBA float image must lie in [0, 1] to be converted to RGB, "
                             f"got [{hwc.min()}, {hwc.max()}]")
        white = 255 if np.issubdtype(hwc.dtype, np.integer) else 1.0
        alpha = hwc[..., 3:4] / white
        composite = alpha * hwc[..., :3] + (1 - alpha) * white
        rgb = np.round(composite).astype(hwc.dtype) if white == 255 else composite.astype(hwc.dtype)
        return np.moveaxis(rgb, -1, 0)
    return image


def _to_chw(image: Any, input_data_format: Optional[str], do_convert_rgb: bool) -> np.ndarray:
    """One raw image (PIL / HW, CHW or HWC array or tensor) as a CHW numpy array."""
    if isinstance(image, PIL.Image.Image):
        array = _convert_rgb_pil(image) if do_convert_rgb else np.array(image)
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        return _convert_rgb_chw(array) if do_convert_rgb else array
    array = _to_numpy(image)
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                       or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"Image arrays must have an integer (e.g. uint8 in [0, 255]) or float dtype, "
                         f"got {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        fmt = input_data_format or _infer_channel_format(array)
        if fmt == CHANNELS_LAST:
            array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"Each image must be 2-D (H, W) or 3-D (C, H, W) / (H, W, C); got shape "
                         f"{tuple(array.shape)} (a batch is a list of images or one 4-D array)")
    if array.shape[-2] == 0 or array.shape[-1] == 0:
        raise ValueError(f"Image has an empty spatial dimension: shape {tuple(array.shape)}")
    return _convert_rgb_chw(array) if do_convert_rgb else array


def _make_flat_list(images: Any) -> List[Any]:
    """Single image, 4-D batch, list of images or list of lists -> flat list of images."""
    if _is_image(images):
        if isinstance(images, PIL.Image.Image) or _to_numpy_ndim(images) in (2, 3):
            return [images]
        if _to_numpy_ndim(images) == 4:
            return list(images)
        raise ValueError(f"An image array must be 2-D, 3-D or a 4-D batch; got shape {tuple(images.shape)}")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is empty; pass a PIL image, an array/tensor or a non-empty list of them")
        flat: List[Any] = []
        for item in images:
            if isinstance(item, (list, tuple)):
                flat.extend(_make_flat_list(item))
            elif _is_image(item):
                if not isinstance(item, PIL.Image.Image) and _to_numpy_ndim(item) == 4:
                    flat.extend(list(item))
                else:
                    flat.append(item)
            else:
                raise ValueError(f"Unsupported image type {type(item).__name__} in the batch; valid: "
                                 f"PIL.Image.Image, numpy.ndarray, torch.Tensor")
        return flat
    raise ValueError(f"Unsupported images type {type(images).__name__}; valid: PIL.Image.Image, "
                     f"numpy.ndarray, torch.Tensor, or a list of them")


def _to_numpy_ndim(x: Any) -> int:
    return x.ndim if isinstance(x, np.ndarray) else x.dim()


def _needs_rescale_for_pil(image: np.ndarray) -> bool:
    """Whether a float image in [0, 1] has to be scaled by 255 to become uint8 for PIL
    (transformers' rule: uint8 or integer-valued in [0, 255] -> no; floats in [0, 1] -> yes)."""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(f"An integer-valued image must lie in [0, 255] to be resized, got "
                         f"[{image.min()}, {image.max()}]")
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(f"A float image must lie in [0, 1] (or hold integers in [0, 255]) to be resized, "
                     f"got [{image.min()}, {image.max()}]")


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    # Upcast first so uint8/float16 inputs give the same float32 result on every numpy.
    return (image.astype(np.float64) * scale).astype(np.float32)


def _pil_resize(image: np.ndarray, height: int, width: int, resample: PIL.Image.Resampling) -> np.ndarray:
    """Resize a CHW array through PIL (uint8), as transformers does; float [0, 1] images are
    scaled to [0, 255], truncated to uint8 and scaled back."""
    if height <= 0 or width <= 0:
        raise ValueError(f"Resize target must be positive, got (height, width)=({height}, {width}); "
                         f"increase size['shortest_edge'] or decrease crop_pct")
    rescaled = _needs_rescale_for_pil(image)
    hwc = np.moveaxis(image, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if rescaled:
        hwc = _rescale(hwc, 255)
    pil = PIL.Image.fromarray(hwc.astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=resample))
    out = out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)
    return _rescale(out, 1 / 255) if rescaled else out


def _center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """Centre crop of a CHW array; an image smaller than the crop is zero-padded around."""
    height, width = image.shape[-2:]
    top, left = (height - crop) // 2, (width - crop) // 2
    bottom, right = top + crop, left + crop
    if top >= 0 and left >= 0 and bottom <= height and right <= width:
        return image[..., top:bottom, left:right]
    new_h, new_w = max(crop, height), max(crop, width)
    padded = np.zeros_like(image, shape=image.shape[:-2] + (new_h, new_w))
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[..., top_pad:top_pad + height, left_pad:left_pad + width] = image
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return padded[..., max(0, top):min(new_h, bottom), max(0, left):min(new_w, right)]


def _normalize(image: np.ndarray, mean: Union[float, Sequence[float]],
               std: Union[float, Sequence[float]]) -> np.ndarray:
    num_channels = image.shape[0]
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    stats = []
    for name, value in (("image_mean", mean), ("image_std", std)):
        values = [value] * num_channels if isinstance(value, (int, float)) else list(value)
        if len(values) != num_channels:
            raise ValueError(f"{name} has {len(values)} values but the image has {num_channels} channels; "
                             f"give one value per channel, or pass do_convert_rgb=True to turn "
                             f"grayscale/RGBA images into RGB")
        stats.append(np.array(values, dtype=image.dtype)[:, None, None])
    return (image - stats[0]) / stats[1]


# --- the processor ---------------------------------------------------------------------
class ConvNextImageProcessor:
    """Prepares images for ConvNeXt the way transformers' `ConvNextImageProcessor` does.

    Args:
        do_resize: resize (and, below 384, centre-crop) the images.
        size: `{"shortest_edge": int}`; >= 384 warps to a square of that size, < 384
            resizes the short side to `int(shortest_edge / crop_pct)` and centre-crops.
        crop_pct: fraction of the resized image kept by the crop (only when shortest_edge < 384).
        resample: PIL resampling filter (`PIL.Image.Resampling` or its int). The default
            BILINEAR is the documented one; transformers 5.x's class default is BICUBIC, and
            hub configs (e.g. facebook/convnext-tiny-224) set 3 = BICUBIC explicitly.
        do_rescale: multiply by `rescale_factor` (1/255 maps uint8 to [0, 1]).
        rescale_factor: the rescale multiplier.
        do_normalize: subtract `image_mean` and divide by `image_std`, per channel.
        image_mean: float or one value per channel (default [0.5, 0.5, 0.5]).
        image_std: float or one value per channel (default [0.5, 0.5, 0.5]).
        do_convert_rgb: convert grayscale / RGBA inputs to RGB first (None: no).
    """

    model_input_names = ["pixel_values"]

    def __init__(self, do_resize: bool = True, size: Optional[Dict[str, int]] = None,
                 crop_pct: Optional[float] = None,
                 resample: Union[int, "PIL.Image.Resampling"] = PIL.Image.Resampling.BILINEAR,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Optional[Union[float, Sequence[float]]] = None,
                 image_std: Optional[Union[float, Sequence[float]]] = None,
                 do_convert_rgb: Optional[bool] = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - _METADATA_KEYS
        if unknown:
            raise ValueError(f"Unknown ConvNextImageProcessor argument(s) {sorted(unknown)}; valid: "
                             f"{list(_PARAM_NAMES)}")
        resolved = self._resolve(dict(
            do_resize=do_resize, size={"shortest_edge": 384} if size is None else size,
            crop_pct=224 / 256 if crop_pct is None else crop_pct, resample=resample,
            do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize,
            image_mean=IMAGENET_STANDARD_MEAN if image_mean is None else image_mean,
            image_std=IMAGENET_STANDARD_STD if image_std is None else image_std,
            do_convert_rgb=do_convert_rgb))
        for name, value in resolved.items():
            setattr(self, name, value)

    @staticmethod
    def _resolve(params: Dict[str, Any]) -> Dict[str, Any]:
        """Validates every processing parameter; returns them normalised."""
        out = dict(params)
        for name in ("do_resize", "do_rescale", "do_normalize"):
            out[name] = _check_bool(name, params[name])
        if params["do_convert_rgb"] is not None:
            out["do_convert_rgb"] = _check_bool("do_convert_rgb", params["do_convert_rgb"])
        out["size"] = _check_size(params["size"])
        out["crop_pct"] = _check_crop_pct(params["crop_pct"])
        out["resample"] = _check_resample(params["resample"])
        factor = params["rescale_factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"rescale_factor must be a finite number (e.g. 1 / 255), got {factor!r}")
        out["rescale_factor"] = float(factor)
        out["image_mean"] = _check_stats("image_mean", params["image_mean"])
        out["image_std"] = _check_stats("image_std", params["image_std"])
        return out

    # --- processing ----------------------------------------------------------------
    def resize(self, image: np.ndarray, size: Dict[str, int], crop_pct: float,
               resample: PIL.Image.Resampling) -> np.ndarray:
        """Resize (and below 384 centre-crop) one CHW array.

        Args:
            image: CHW array (uint8, integer-valued, or float in [0, 1]).
            size: `{"shortest_edge": int}`.
            crop_pct: kept fraction for the < 384 regime.
            resample: PIL filter.
        """
        shortest_edge = size["shortest_edge"]
        if shortest_edge >= 384:
            # Large evaluation sizes are warped, not cropped (ConvNeXt's fine-tuning recipe).
            return _pil_resize(image, shortest_edge, shortest_edge, resample)
        new_short = int(shortest_edge / crop_pct)
        height, width = image.shape[-2:]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(new_short * long / short)
        new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
        image = _pil_resize(image, new_h, new_w, resample)
        return _center_crop(image, shortest_edge)

    def preprocess(self, images: Any, do_resize: Optional[bool] = None,
                   size: Optional[Dict[str, int]] = None, crop_pct: Optional[float] = None,
                   resample: Optional[Union[int, "PIL.Image.Resampling"]] = None,
                   do_rescale: Optional[bool] = None, rescale_factor: Optional[float] = None,
                   do_normalize: Optional[bool] = None,
                   image_mean: Optional[Union[float, Sequence[float]]] = None,
                   image_std: Optional[Union[float, Sequence[float]]] = None,
                   do_convert_rgb: Optional[bool] = None, return_tensors: Optional[str] = None,
                   data_format: str = CHANNELS_FIRST, input_data_format: Optional[str] = None,
                   **kwargs: Any) -> BatchFeature:
        """Processes one image or a batch.

        Args:
            images: a PIL image, an array/tensor (HW, CHW or HWC; uint8, integer-valued or
                float in [0, 1]), a 4-D batch array/tensor, or a list of those.
            do_resize, size, crop_pct, resample, do_rescale, rescale_factor, do_normalize,
                image_mean, image_std, do_convert_rgb: override the processor's values.
            return_tensors: None (list of CHW/HWC float32 numpy arrays), "np" (one stacked
                array) or "pt" (one torch tensor).
            data_format: "channels_first" (N, C, H, W) or "channels_last" (N, H, W, C).
            input_data_format: layout of array inputs; inferred from the channel count when None.

        Returns:
            `BatchFeature` with `pixel_values`.
        """
        if kwargs:
            raise ValueError(f"Unknown preprocess argument(s) {sorted(kwargs)}; valid: "
                             f"{list(_PARAM_NAMES + _CALL_ONLY_NAMES)}")
        given = dict(do_resize=do_resize, size=size, crop_pct=crop_pct, resample=resample,
                     do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize,
                     image_mean=image_mean, image_std=image_std, do_convert_rgb=do_convert_rgb)
        p = self._resolve({k: getattr(self, k) if v is None else v for k, v in given.items()})
        return_tensors = _check_return_tensors(return_tensors)
        data_format = _check_format("data_format", data_format, allow_none=False)
        input_data_format = _check_format("input_data_format", input_data_format, allow_none=True)

        processed = []
        for image in _make_flat_list(images):
            array = _to_chw(image, input_data_format, bool(p["do_convert_rgb"]))
            if p["do_resize"]:
                array = self.resize(array, p["size"], p["crop_pct"], p["resample"])
            if p["do_rescale"]:
                array = _rescale(array, p["rescale_factor"])
            if p["do_normalize"]:
                array = _normalize(array, p["image_mean"], p["image_std"])
            if data_format == CHANNELS_LAST:
                array = np.moveaxis(array, 0, -1)
            processed.append(array)
        return BatchFeature(pixel_values=self._convert(processed, return_tensors))

    @staticmethod
    def _convert(arrays: List[np.ndarray], return_tensors: Optional[str]) -> Any:
        if return_tensors is None:
            return arrays
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"Cannot stack images of different shapes {sorted(shapes)} into one "
                             f"{return_tensors!r} batch; use do_resize=True or return_tensors=None")
        stacked = np.stack(arrays)
        if return_tensors == "np":
            return stacked
        import torch

        return torch.from_numpy(np.ascontiguousarray(stacked))

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        """Same as `preprocess(images, **kwargs)`."""
        return self.preprocess(images, **kwargs)

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready parameters, in the keys transformers' preprocessor_config.json uses."""
        out: Dict[str, Any] = {
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "crop_pct": self.crop_pct,
            "resample": int(self.resample),
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean) if isinstance(self.image_mean, tuple) else self.image_mean,
            "image_std": list(self.image_std) if isinstance(self.image_std, tuple) else self.image_std,
            "image_processor_type": "ConvNextImageProcessor",
        }
        if self.do_convert_rgb is not None:
            out["do_convert_rgb"] = self.do_convert_rgb
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config: Dict[str, Any], **overrides: Any) -> "ConvNextImageProcessor":
        """Builds a processor from a preprocessor_config.json dict (ours or transformers')."""
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        params = {k: v for k, v in config.items() if k in _PARAM_NAMES}
        ignored = sorted(set(config) - set(_PARAM_NAMES) - _METADATA_KEYS)
        if ignored:
            # Other transformers processors' keys (e.g. crop_size) do not apply to ConvNeXt.
            logger.warning("Ignoring preprocessor config keys %s not used by ConvNextImageProcessor", ignored)
        params.update(overrides)
        return cls(**params)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> str:
        """Writes `preprocessor_config.json` (atomically) into `directory`; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(os.fspath(directory), IMAGE_PROCESSOR_NAME)
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides: Any) -> "ConvNextImageProcessor":
        """Reads `preprocessor_config.json` from a directory (or the JSON file itself).

        Args:
            path: a local directory holding preprocessor_config.json, or the file.
            **overrides: processor arguments applied on top of the stored ones.
        """
        path = os.fspath(path)
        file = os.path.join(path, IMAGE_PROCESSOR_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No {IMAGE_PROCESSOR_NAME} at {path!r}; pass a local directory "
                                    f"written by save_pretrained (hub downloads are not supported)")
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConvNextImageProcessor) and self.to_dict() == other.to_dict()


class ConvNextFeatureExtractor(ConvNextImageProcessor):
    """Deprecated name of `ConvNextImageProcessor` (as in transformers); identical behaviour."""
