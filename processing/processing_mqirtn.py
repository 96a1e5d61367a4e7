"""MQIRTNProcessor: prepares (reference image, modification text[, target image]) batches for MQIRTNModel.

Hub code: imports only transformers, torch, numpy and PIL (which transformers' image processors need anyway).
"""

import io
import math
import os
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, Unpack
from transformers.tokenization_utils_base import TextInput


# File suffixes read as images wherever a folder is scanned (the index, MIT-States), lower case.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What PIL raises for files that are missing, truncated or not images.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _pixel_cap_from_environment() -> int | None:
    text = os.environ.get("MQIRTN_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return 64_000_000
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"MQIRTN_MAX_IMAGE_PIXELS must be a positive integer or 'none', got {text!r}")
    return int(text)


# The most pixels (width x height) an image may have. Checked from the file header before any pixel is decoded, so a
# decompression bomb (a few KB that decode to gigabytes) is an unreadable image like any other: skipped and counted
# where images are skipped, `ImageDecodeError` elsewhere. A larger JPEG is decoded at 1/2, 1/4 or 1/8 scale (PIL's
# `draft`) when that brings it under the cap. Default 64 million (8000 x 8000); set the environment variable
# MQIRTN_MAX_IMAGE_PIXELS (a number or "none") or assign this attribute. PIL's own limit (twice
# `PIL.Image.MAX_IMAGE_PIXELS`) still applies above it.
MAX_IMAGE_PIXELS: int | None = _pixel_cap_from_environment()
# The most bytes read from an image URL.
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


def _fetch(url: str, timeout: float = 30.0) -> io.BytesIO:
    """The bytes at `url` (at most `MAX_DOWNLOAD_BYTES`); `OSError` when it cannot be fetched or is larger."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise OSError(f"the download is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return io.BytesIO(data)


def _check_pixels(image: Image.Image, where: str, described: str) -> None:
    """Raises `ImageDecodeError` when `image` (opened, not yet decoded) is over `MAX_IMAGE_PIXELS`; a JPEG is first
    set to decode at the smallest reduction (`draft`) that fits, when one does."""
    cap = MAX_IMAGE_PIXELS
    width, height = image.size
    if cap is None or width * height <= cap:
        return
    if image.format == "JPEG":  # `draft` acts only before the pixels are decoded (a no-op after)
        scale = math.sqrt(cap / (width * height))
        image.draft(image.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
        if image.size[0] * image.size[1] <= cap:
            return
    raise ImageDecodeError(
        f"{where}: the image {described!r} is {width} x {height} = {width * height} pixels, more than the cap of {cap} "
        "(a decompression bomb?); raise MQIRTN_MAX_IMAGE_PIXELS to read it"
    )


class ImageDecodeError(ValueError):
    """An image file or buffer could not be read (missing, truncated, not an image)."""


def _open(image, where: str) -> Image.Image:
    """Reads a path, URL or `datasets` image cell (`{"bytes": ..., "path": ...}`); raises `ImageDecodeError`."""
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data is None and not path:
            raise ImageDecodeError(f"{where}: the image entry has neither `bytes` nor `path`")
        source = io.BytesIO(data) if data is not None else Path(path)
        described = path or "<bytes>"
    else:
        source, described = image, str(image)
    try:
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            source = _fetch(source)
        with warnings.catch_warnings():  # the header's size is checked against our own cap just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source if isinstance(source, io.BytesIO) else Path(source))
        _check_pixels(opened, where, described)
        opened.load()
    except ImageDecodeError:
        raise
    except _UNREADABLE as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise ImageDecodeError(f"{where}: could not read the image {described!r}: {message}") from error
    return opened


def to_rgb_image(image, argument: str = "images", index: int | None = None) -> Image.Image:
    """Converts one image to an RGB PIL image: the one image decoder of this package (training, evaluation, the
    pipeline, the index and the pictures all call it, so a picture looks the same to all of them).

    `image` is a PIL image, a numpy array (`(H, W)`, `(H, W, 3|4)` or `(3|4, H, W)`), a path, a URL or a `datasets`
    image cell (`{"bytes": ..., "path": ...}`). Grayscale, palette, CMYK and 16-bit images are converted; transparent
    pixels are laid on white. An unreadable file raises `ImageDecodeError` (a `ValueError`), any other type
    `ValueError`, both naming `argument` (and the position in a list) and what came.

    >>> from PIL import Image
    >>> to_rgb_image(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0))
    (255, 255, 255)
    >>> to_rgb_image(Image.new("L", (2, 2), 128)).mode
    'RGB'
    """
    where = f"`{argument}`" if index is None else f"`{argument}[{index}]`"
    if isinstance(image, (str, os.PathLike)) or (isinstance(image, dict) and ("bytes" in image or "path" in image)):
        image = _open(image, where)
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # channels-first -> channels-last
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(
                f"{where}: a numpy image must be (H, W), (H, W, 3|4) or (3|4, H, W), got shape {image.shape}"
            )
        if array.dtype != np.uint8:
            peak = float(array.max()) if array.size else 0.0
            if np.issubdtype(array.dtype, np.integer) and peak > 255:
                # 16-bit (or wider) data: scaled by its peak, as the decoder does for 16-bit image files (not clipped).
                array = (array.astype(np.float64) / peak * 255).astype(np.uint8)
            else:
                array = np.clip(array * 255.0 if peak <= 1.0 else array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            f"{where} must be a PIL image, a numpy array, a path, a URL or a {{'bytes', 'path'}} dict, "
            f"got {type(image).__name__}"
        )
    else:
        # A PIL image may still be lazy (`Image.open`, a decoded `datasets` cell): the cap applies before it decodes.
        described = getattr(image, "filename", "") or f"<{type(image).__name__} {image.mode} {image.size}>"
        _check_pixels(image, where, described)
        try:
            image.load()
        except _UNREADABLE as error:
            message = " ".join(str(error).split()) or type(error).__name__
            raise ImageDecodeError(f"{where}: could not read the image {described!r}: {message}") from error
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.max() > 0 else 1.0
        return Image.fromarray((array / peak * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def to_rgb_image_or_none(image, argument: str = "images", index: int | None = None) -> Image.Image | None:
    """`to_rgb_image` for the skip-and-count paths: `None` (instead of `ImageDecodeError`) when `image` is `None` or
    cannot be decoded; the caller counts and reports what it skipped. Other mistakes (a wrong type) still raise.

    >>> to_rgb_image_or_none({"bytes": b"not an image", "path": None}) is None
    True
    """
    if image is None:
        return None
    try:
        return to_rgb_image(image, argument, index)
    except ImageDecodeError:
        return None


def _as_list(value, argument: str) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"`{argument}` is an empty list; give at least one item")
    return items


# Image-processor settings `_resize_rescale_normalize_recipe` accepts whatever their value: they change nothing for
# RGB PIL images turned into one float batch (input layout, output tensor type, grouping, sequence length).
_NEUTRAL_SETTINGS = frozenset(
    {
        "do_convert_rgb",
        "default_to_square",
        "input_data_format",
        "return_tensors",
        "disable_grouping",
        "image_seq_length",
        "device",
    }
)


def _resize_rescale_normalize_recipe(image_processor) -> tuple | None:
    """`(height, width, resample, table)` when `image_processor` is transformers' PIL backend set to resize every image
    to one height x width, then rescale and/or normalize (the ViT recipe this package trains with) and nothing else;
    None for any other image processor or setting, which then runs itself.

    `table` (`np.ndarray` of shape `(3, 256)`, float32): the value a byte of each channel becomes, computed by the
    image processor's own `rescale` and `normalize` on an image holding the 256 byte values, so looking pixels up in
    it gives the image processor's float32 bits (tests/test_fast_pixels.py compares them on every setting). Per
    image, transformers' PIL backend turns the picture into an array, back into a picture to resize it, into an array
    again and rescales and normalizes it in float64/float32 numpy: 0.139 ms for a 48 px image here against 0.050 ms
    for the processor this way, 1.7-1.8x where it resizes (benchmarks/pixel_path.py) -- what a DataLoader worker
    indexing a gallery spends besides decoding.
    """
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # another transformers layout: the image processor runs itself
        return None
    if not isinstance(image_processor, PilBackend):
        return None
    kind = type(image_processor)
    # A subclass that changes any step (e.g. patches, padding) is not the plain recipe.
    for step in (
        "preprocess",
        "_preprocess_image_like_inputs",
        "_prepare_image_like_inputs",
        "process_image",
        "_preprocess",
        "resize",
        "rescale",
        "normalize",
        "_standardize_kwargs",
    ):
        if getattr(kind, step, None) is not getattr(PilBackend, step, None):
            return None
    settings = {name: getattr(image_processor, name, None) for name in image_processor._valid_kwargs_names}
    size = settings.pop("size", None)
    resample = settings.pop("resample", None)
    do_rescale, rescale_factor = settings.pop("do_rescale", None), settings.pop("rescale_factor", None)
    do_normalize = settings.pop("do_normalize", None)
    image_mean, image_std = settings.pop("image_mean", None), settings.pop("image_std", None)
    if settings.pop("do_resize", None) is not True or not (do_rescale or do_normalize):
        return None
    if settings.pop("do_center_crop", None):
        return None
    settings.pop("crop_size", None)
    if settings.pop("do_pad", None):
        return None
    settings.pop("pad_size", None)
    if settings.pop("data_format", None) not in (None, "channels_first"):
        return None
    if any(value is not None for name, value in settings.items() if name not in _NEUTRAL_SETTINGS):
        return None  # a setting this recipe does not know
    if size is None or not isinstance(resample, int):
        return None
    size = dict(size)
    height, width = size.pop("height", None), size.pop("width", None)
    if not height or not width or any(value is not None for value in size.values()):
        return None  # shortest_edge, max_height, ...: sizes that depend on the image
    # Channels first, like the backend's own images: channel c holds the 256 byte values.
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    if do_rescale:
        values = image_processor.rescale(values, rescale_factor)
    if do_normalize:
        values = image_processor.normalize(values, image_mean, image_std)
    table = np.ascontiguousarray(values[:, 0, :])
    if table.dtype != np.float32:
        return None
    return int(height), int(width), resample, table


def _pixels_by_recipe(images: list, height: int, width: int, resample: int, table: np.ndarray):
    """`(len(images), 3, height, width)` float32 pixel values of RGB PIL `images`: each resized as transformers' PIL
    backend resizes it (PIL, `reducing_gap=None`), then looked up in `table` (see `_resize_rescale_normalize_recipe`)."""
    arrays = []
    for image in images:
        if image.size != (width, height):
            image = image.resize((width, height), resample=resample, reducing_gap=None)
        arrays.append(np.asarray(image))
    stacked = np.stack(arrays)  # (batch, height, width, 3) bytes
    pixel_values = np.empty((len(images), 3, height, width), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], stacked[..., channel], out=pixel_values[:, channel])
    return torch.from_numpy(pixel_values)


def _typed_keys(typed_dict) -> set[str]:
    """The keys of a TypedDict and, for its TypedDict-valued keys (`text_kwargs`, ...), theirs."""
    keys = set()
    for name, annotation in typed_dict.__annotations__.items():
        keys.add(name)
        keys.update(getattr(annotation, "__annotations__", {}))
    return keys


class MQIRTNProcessor(ProcessorMixin):
    r"""
    Wraps an image processor and a tokenizer into one processor for composed image retrieval.

    `processor(images=..., text=..., target_images=...)` returns `pixel_values` (reference images,
    `(batch, 3, H, W)`), `input_ids` and `attention_mask` (modification texts, `(batch, length)`) and
    `target_pixel_values` (`(batch, 3, H, W)`), as PyTorch tensors. Each argument may be given alone (e.g. gallery
    images only).

    Settings follow transformers' `ProcessingKwargs`: flat (`padding="max_length", max_length=16, do_resize=False`),
    per modality (`text_kwargs={...}`, `images_kwargs={...}`; the same setting in both is a `ValueError`) or
    `common_kwargs={...}`. The text defaults are `padding=True, truncation=True, return_token_type_ids=False`
    (the `text_kwargs` class attribute); the image processor's own settings are its defaults, and `images_kwargs`
    apply to the target images too. Images are read by `to_rgb_image` (paths, URLs, arrays; the pixel cap
    `MAX_IMAGE_PIXELS`); an image processor with the plain resize/rescale/normalize recipe and no `images_kwargs` at
    call time gives its pixels through a lookup table, bit-identical to running it.

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import BertTokenizer, ViTImageProcessor
    >>> from processing import MQIRTNProcessor
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "vocab.txt"), "w") as f:
    ...     _ = f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "make", "it", "blue"]))
    >>> processor = MQIRTNProcessor(ViTImageProcessor(size={"height": 32, "width": 32}), BertTokenizer(os.path.join(folder, "vocab.txt")))
    >>> batch = processor(images=[Image.new("RGB", (40, 40))], text=["make it blue"], target_images=[Image.new("L", (50, 50))])
    >>> batch["pixel_values"].shape, batch["input_ids"].shape, batch["target_pixel_values"].shape
    (torch.Size([1, 3, 32, 32]), torch.Size([1, 5]), torch.Size([1, 3, 32, 32]))
    >>> processor(text=["make it blue"], padding="max_length", max_length=8)["input_ids"].shape
    torch.Size([1, 8])
    ```
    """

    # Per-modality defaults (lowest priority in `ProcessingKwargs`): every text of a batch padded to the longest,
    # truncated to the tokenizer's limit, no token type ids (the text tower reads `input_ids` and `attention_mask`).
    text_kwargs = {"padding": True, "truncation": True, "return_token_type_ids": False}

    def __init__(self, image_processor=None, tokenizer=None):
        super().__init__(image_processor, tokenizer)

    def _pixels(self, images, argument: str, images_kwargs: dict | None = None):
        """`(len(images), 3, H, W)` pixel values; `images_kwargs` override the image processor's settings."""
        images_kwargs = images_kwargs or {}
        rgb = [to_rgb_image(image, argument, i) for i, image in enumerate(images)]
        if not images_kwargs:
            recipe = _resize_rescale_normalize_recipe(self.image_processor)
            if recipe is not None:
                return _pixels_by_recipe(rgb, *recipe)
        return self.image_processor(images=rgb, **images_kwargs, return_tensors="pt")["pixel_values"]

    def _check_kwargs(self, kwargs: dict) -> None:
        """`TypeError` naming any keyword argument that neither `ProcessingKwargs` nor the image processor knows
        (transformers would log a warning and ignore it)."""
        valid = _typed_keys(self.valid_processor_kwargs) | {"common_kwargs"}
        valid |= set(getattr(getattr(self.image_processor, "valid_kwargs", None), "__annotations__", {}))
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(
                f"MQIRTNProcessor got unexpected keyword arguments {unknown}: give tokenizer settings (padding, "
                "max_length, ...) and image-processor settings (do_resize, size, ...) flat or in `text_kwargs` / "
                "`images_kwargs`"
            )

    def _cap_default_max_length(self, text_kwargs: dict, kwargs: dict) -> None:
        """A `max_length` the caller did not give (one saved in the tokenizer's files) never exceeds the tokenizer's
        `model_max_length`, which a model whose text tower has fewer positions lowers after loading."""
        parts = (kwargs, kwargs.get("text_kwargs"), kwargs.get("common_kwargs"))
        given = any("max_length" in (part or {}) for part in parts)
        limit = getattr(self.tokenizer, "model_max_length", None)
        default = text_kwargs.get("max_length")
        if not given and isinstance(limit, int) and isinstance(default, int) and default > limit:
            text_kwargs["max_length"] = limit

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        target_images: ImageInput | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        r"""
        images (PIL image, numpy array, path, URL, or a list of them, *optional*): reference images.
        text (`str` or `list[str]`, *optional*): modification texts; an empty string makes a pure image query.
        target_images (same types as `images`, *optional*): target images (training).
        kwargs: `ProcessingKwargs` settings, flat or nested (see the class docstring); `return_tensors` may only be
            `"pt"` (the default): MQIRTN is a PyTorch model.
        """
        self._check_kwargs(kwargs)
        tokenizer_init_kwargs = self.tokenizer.init_kwargs if self.tokenizer else {}
        merged = self._merge_kwargs(self.valid_processor_kwargs, tokenizer_init_kwargs=tokenizer_init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        self._cap_default_max_length(text_kwargs, kwargs)
        for flag in ("return_mm_token_type_ids", "return_text_replacement_offsets"):
            if merged.get(flag) or text_kwargs.pop(flag, None):
                raise ValueError(f"`{flag}` does not apply to MQIRTN: its texts hold no image placeholder tokens")
        for settings in (text_kwargs, images_kwargs):
            return_tensors = settings.pop("return_tensors", None)
            if return_tensors not in (None, "pt"):
                raise ValueError(f"`return_tensors` must be 'pt' (MQIRTN is a PyTorch model), got {return_tensors!r}")
        if images is None and text is None and target_images is None:
            raise ValueError("Give at least one of `images`, `text` or `target_images`")
        lengths = {}
        data = {}
        if images is not None:
            images = _as_list(images, "images")
            lengths["images"] = len(images)
        if text is not None:
            texts = _as_list(text, "text")
            for i, item in enumerate(texts):
                if not isinstance(item, str):
                    raise ValueError(f"`text[{i}]` must be a string, got {type(item).__name__}")
            lengths["text"] = len(texts)
        if target_images is not None:
            target_images = _as_list(target_images, "target_images")
            lengths["target_images"] = len(target_images)
        if len(set(lengths.values())) > 1:
            described = ", ".join(f"`{name}` has {count}" for name, count in lengths.items())
            raise ValueError(f"`images`, `text` and `target_images` must have the same length, but {described}")

        if images is not None:
            data["pixel_values"] = self._pixels(images, "images", images_kwargs)
        if text is not None:
            encoded = self.tokenizer(texts, **text_kwargs, return_tensors="pt")
            data.update(encoded)
        if target_images is not None:
            data["target_pixel_values"] = self._pixels(target_images, "target_images", images_kwargs)
        return BatchFeature(data=data, tensor_type="pt")

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        r"""
        `ProcessorMixin.save_pretrained` (`processor_config.json` with its `auto_map`, the tokenizer's files and this
        file's code). transformers sets `auto_map` on the processor while saving; it is removed again afterwards, so
        `to_dict()` stays equal to that of the processor `from_pretrained` loads from the folder.
        """
        had_auto_map = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            if not had_auto_map:
                self.__dict__.pop("auto_map", None)

    @property
    def model_input_names(self):
        return ["pixel_values", "input_ids", "attention_mask", "target_pixel_values"]


__all__ = ["IMAGE_EXTENSIONS", "ImageDecodeError", "MQIRTNProcessor", "to_rgb_image", "to_rgb_image_or_none"]
