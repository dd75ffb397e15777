"""transformers image processors and vitkit's :class:`~vitkit.preprocessing.Preprocessing` record, both ways.

Writing: :func:`processor_config` gives the ``preprocessor_config.json`` of a standard transformers processor
that computes what vitkit's eval transform computes: ``BitImageProcessor`` (shorter side resized, centre
crop) for ``center`` mode, ``ViTImageProcessor`` for ``squash`` without a crop, ``BitImageProcessor`` with
``size: {height, width}`` for ``squash`` with one. transformers' default (torchvision) backend resizes uint8
images with the same antialiased kernel as vitkit, to the same size (``int(side * long / short)``), and
crops at the same offset (rounded down), so the pixels agree exactly; only the order of the float
normalisation differs.

Reading: :func:`preprocessing_from_processor` turns a processor's file (as ``save_pretrained`` writes it, or
written by hand: keys left out take the class's defaults) into the record, for ``ViTImageProcessor``,
``DeiTImageProcessor``, ``BitImageProcessor``, ``CLIPImageProcessor``, ``ConvNextImageProcessor`` and
processors that use only the standard keys. What the record cannot express is refused with the key.
"""

from __future__ import annotations

from typing import Any

from vitkit.preprocessing import HALF, Interpolation, Preprocessing

PROCESSOR_CONFIG = "preprocessor_config.json"
RESAMPLE: dict[Interpolation, int] = {"nearest": 0, "bilinear": 2, "bicubic": 3}
"""PIL's resampling codes, as image processors store them."""
RESCALE_FACTOR = 1 / 255

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SQUARE_224 = {"height": 224, "width": 224}
_CLIP_LIKE = {"size": {"shortest_edge": 224}, "crop_size": _SQUARE_224, "do_center_crop": True, "resample": 3,
              "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    # transformers 5's class attributes, for the keys a hand-written file leaves out
    "ViTImageProcessor": {"size": _SQUARE_224, "do_center_crop": False, "resample": 2, "image_mean": HALF,
                          "image_std": HALF},
    "DeiTImageProcessor": {"size": {"height": 256, "width": 256}, "crop_size": _SQUARE_224, "do_center_crop": True,
                           "resample": 3, "image_mean": HALF, "image_std": HALF},
    "BitImageProcessor": _CLIP_LIKE,
    "CLIPImageProcessor": _CLIP_LIKE,
    "ConvNextImageProcessor": {"size": {"shortest_edge": 384}, "crop_pct": 224 / 256, "do_center_crop": False,
                               "resample": 3, "image_mean": HALF, "image_std": HALF},
}
_SHORTEST_EDGE_BY_DEFAULT = ("BitImageProcessor", "CLIPImageProcessor", "ConvNextImageProcessor")
_CONVNEXT_WARP_FROM = 384  # ConvNextImageProcessor resizes both sides, without a crop, from this shortest_edge on


# ------------------------------------------------------------------------------------------ writing
def processor_config(record: Preprocessing) -> dict[str, Any] | None:
    """The ``preprocessor_config.json`` content that prepares images as ``record`` does (at its size), or
    None for a record of other than 3 channels (transformers' processors make RGB inputs)."""
    if len(record.mean) != 3:
        return None
    height, width = record.size
    common = {"do_resize": True, "resample": RESAMPLE[record.interpolation], "do_rescale": True,
              "rescale_factor": RESCALE_FACTOR, "do_normalize": True, "image_mean": list(record.mean),
              "image_std": list(record.std), "do_convert_rgb": True}
    resize = record.resize_size
    if isinstance(resize, int):  # centre mode, square input: the shorter side, then the centre square
        return {"image_processor_type": "BitImageProcessor", **common, "size": {"shortest_edge": resize},
                "do_center_crop": True, "crop_size": {"height": height, "width": width}}
    if resize == (height, width):  # both sides to the input size, nothing cropped
        return {"image_processor_type": "ViTImageProcessor", **common, "size": {"height": height, "width": width},
                "do_center_crop": False}
    return {"image_processor_type": "BitImageProcessor", **common, "size": {"height": resize[0], "width": resize[1]},
            "do_center_crop": True, "crop_size": {"height": height, "width": width}}


# ------------------------------------------------------------------------------------------ reading
class ProcessorError(ValueError):
    """A processor file vitkit's record cannot reproduce; the message names the key."""


def processor_type(data: dict[str, Any]) -> str:
    """The processor class a file names, without transformers 4's ``Fast`` / 5's ``Pil`` suffix."""
    name = str(data.get("image_processor_type")
               or str(data.get("feature_extractor_type", "")).replace("FeatureExtractor", "ImageProcessor"))
    return name.removesuffix("Fast").removesuffix("Pil")


def _size_dict(value: Any, key: str, shortest_edge: bool) -> dict[str, int]:
    if isinstance(value, bool):
        raise ProcessorError(f"{key}={value!r} is not a size")
    if isinstance(value, int):
        return {"shortest_edge": value} if shortest_edge else {"height": value, "width": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        return dict(value)
    raise ProcessorError(f"{key}={value!r} is not a size (an int, [height, width] or a size dict)")


def preprocessing_from_processor(data: dict[str, Any]) -> Preprocessing:
    """The record that prepares images as the processor file ``data`` does; :class:`ProcessorError` names
    the key at fault when it cannot."""
    kind = processor_type(data)
    known = CLASS_DEFAULTS.get(kind)
    if known is None and "crop_pct" in data:
        raise ProcessorError(f"image_processor_type {kind!r}: its crop_pct is not one vitkit knows how to read "
                             f"(vitkit reads {', '.join(CLASS_DEFAULTS)} and processors with standard keys)")
    values = {**(known or CLASS_DEFAULTS["ViTImageProcessor"]), **{k: v for k, v in data.items() if v is not None}}
    if not values.get("do_resize", True):
        raise ProcessorError("do_resize=false: vitkit always resizes images to the model's input size")
    if not values.get("do_rescale", True) or abs(float(values.get("rescale_factor", RESCALE_FACTOR))
                                                 - RESCALE_FACTOR) > 1e-12:
        raise ProcessorError(f"do_rescale={values.get('do_rescale')!r}, rescale_factor="
                             f"{values.get('rescale_factor')!r}: vitkit scales pixels by 1/255")
    if values.get("do_normalize", True):
        mean, std = values["image_mean"], values["image_std"]
    else:
        mean, std = 0.0, 1.0
    resample = values.get("resample", 2)
    interpolation = next((name for name, code in RESAMPLE.items() if code == resample), None)
    if interpolation is None:
        raise ProcessorError(f"resample={resample!r} is not one vitkit's eval transform reproduces "
                             f"({', '.join(f'{code} ({name})' for name, code in RESAMPLE.items())})")
    size = _size_dict(values["size"], "size", kind in _SHORTEST_EDGE_BY_DEFAULT)
    crop = _size_dict(values["crop_size"], "crop_size", False) if values.get("do_center_crop") else None
    if crop is not None and ("height" not in crop or "width" not in crop):
        raise ProcessorError(f"crop_size={values['crop_size']!r} needs a height and a width")
    if "longest_edge" in size or "max_height" in size:
        raise ProcessorError(f"size={values['size']!r}: a capped size gives inputs of varying size")

    if kind == "ConvNextImageProcessor":
        edge = size.get("shortest_edge")
        if edge is None:
            raise ProcessorError(f"size={values['size']!r}: ConvNextImageProcessor needs a shortest_edge")
        if crop is not None and (crop["height"], crop["width"]) != (edge, edge):
            raise ProcessorError(f"do_center_crop with crop_size={crop!r}: a second crop after crop_pct's")
        if edge < _CONVNEXT_WARP_FROM:
            mode, resize, crop = "center", int(edge / float(values["crop_pct"])), {"height": edge, "width": edge}
        else:
            mode, resize, crop = "squash", (edge, edge), None
    elif "shortest_edge" in size:
        mode, resize = "center", size["shortest_edge"]
        if crop is None:
            raise ProcessorError(f"size={values['size']!r} without a centre crop: images of other aspect ratios "
                                 "would give inputs of other sizes")
        if crop["height"] != crop["width"]:
            raise ProcessorError(f"crop_size={crop!r}: a non-square crop after a shortest_edge resize")
    elif "height" in size and "width" in size:
        mode, resize = "squash", (size["height"], size["width"])
    else:
        raise ProcessorError(f"size={values['size']!r} has neither a shortest_edge nor a height and width")

    out = (crop["height"], crop["width"]) if crop is not None else (resize if isinstance(resize, tuple)
                                                                     else (resize, resize))
    first = resize if isinstance(resize, int) else resize[0]
    if first < out[0] or (isinstance(resize, tuple) and resize[1] < out[1]):
        raise ProcessorError(f"crop_size={crop!r} is larger than the resized image ({resize!r}): vitkit does not pad")
    crop_pct = out[0] / first  # so that resize_size gives back `first` exactly
    try:
        record = Preprocessing(size=out, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
                               crop_mode=mode)
    except ValueError as e:
        raise ProcessorError(str(e)) from None
    if isinstance(resize, tuple) and record.resize_size != resize:
        raise ProcessorError(f"size={values['size']!r}, crop_size={crop!r}: the crop keeps a different fraction of "
                             "the height and of the width, which vitkit's crop_pct cannot say")
    return record
