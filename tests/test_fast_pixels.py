"""The processor's own resize-rescale-normalize path (`_resize_rescale_normalize_recipe`): for transformers' PIL-backend
image processors set to the plain ViT recipe it gives the image processor's float32 pixel values bit for bit, on
every setting it accepts; every other image processor or setting runs the image processor itself."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import ViTImageProcessorPil

from processing import MQIRTNProcessor
from processing.processing_mqirtn import _resize_rescale_normalize_recipe, to_rgb_image


def images(seed: int, count: int = 9, low: int = 3, high: int = 90) -> list:
    """Random-pixel images of random sizes (some larger, some smaller than the targets, non-square), one RGBA, one
    grayscale, one exactly 32 x 32."""
    rng = np.random.default_rng(seed)
    made = [
        Image.fromarray(
            rng.integers(0, 256, (int(rng.integers(low, high)), int(rng.integers(low, high)), 3), dtype=np.uint8)
        )
        for _ in range(count)
    ]
    made.append(Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), mode="RGBA"))
    made.append(Image.fromarray(rng.integers(0, 256, (40, 25), dtype=np.uint8), mode="L"))
    made.append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    return made


def with_processor(image_processor, processor) -> MQIRTNProcessor:
    """`processor` (the tiny one: its tokenizer) with another image processor."""
    return MQIRTNProcessor(image_processor=image_processor, tokenizer=processor.tokenizer)


def reference_pixels(image_processor, items) -> torch.Tensor:
    """What the image processor itself makes of the package's decoded images."""
    rgb = [to_rgb_image(item) for item in items]
    return image_processor(images=rgb, return_tensors="pt")["pixel_values"]


SETTINGS = [
    {},
    {"resample": Image.Resampling.NEAREST},
    {"resample": Image.Resampling.LANCZOS},
    {"resample": Image.Resampling.BICUBIC},
    {"resample": Image.Resampling.BOX},
    {"resample": Image.Resampling.HAMMING},
    {"do_rescale": False},
    {"do_normalize": False},
    {"image_mean": 0.3, "image_std": 0.7},
    {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    {"rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3, "image_std": [1.0] * 3},
    {"size": {"height": 17, "width": 45}},
    {"size": {"height": 224, "width": 224}},
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "vit")
def test_recipe_gives_the_image_processors_bits(processor, setting):
    setting = {"size": {"height": 32, "width": 32}, **setting}
    image_processor = ViTImageProcessorPil(**setting)
    assert _resize_rescale_normalize_recipe(image_processor) is not None
    items = images(len(str(setting)))
    ours = with_processor(image_processor, processor)(images=items)["pixel_values"]
    expected = reference_pixels(image_processor, items)
    assert ours.dtype == expected.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.equal(ours, expected)  # bit for bit


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    height=st.integers(1, 64),
    width=st.integers(1, 64),
    resample=st.sampled_from(list(Image.Resampling)),
    mean=st.floats(-2, 2, allow_nan=False),
    std=st.floats(0.01, 4, allow_nan=False),
)
def test_recipe_bits_on_any_size_and_numbers(processor, seed, height, width, resample, mean, std):
    image_processor = ViTImageProcessorPil(
        size={"height": height, "width": width}, resample=resample, image_mean=[mean] * 3, image_std=[std] * 3
    )
    items = images(seed, count=3, low=1, high=70)
    assert torch.equal(
        with_processor(image_processor, processor)(images=items)["pixel_values"],
        reference_pixels(image_processor, items),
    )


class PaddingViT(ViTImageProcessorPil):
    """A subclass that changes a step: not the plain recipe."""

    def _preprocess(self, images, **kwargs):
        result = super()._preprocess(images, **kwargs)
        result["pixel_values"] = result["pixel_values"] + 1
        return result


OTHER = [
    (
        "center crop",
        lambda: ViTImageProcessorPil(
            size={"height": 40, "width": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32}
        ),
    ),
    (
        "shortest edge",
        lambda: ViTImageProcessorPil(
            size={"shortest_edge": 32}, do_center_crop=True, crop_size={"height": 32, "width": 32}
        ),
    ),
    ("no resize", lambda: ViTImageProcessorPil(size={"height": 32, "width": 32}, do_resize=False)),
    (
        "bytes out",
        lambda: ViTImageProcessorPil(size={"height": 32, "width": 32}, do_rescale=False, do_normalize=False),
    ),
    ("subclass", lambda: PaddingViT(size={"height": 32, "width": 32})),
]


@pytest.mark.parametrize("name,make", OTHER, ids=[name for name, _ in OTHER])
def test_other_image_processors_run_themselves(processor, name, make, monkeypatch):
    image_processor = make()
    assert _resize_rescale_normalize_recipe(image_processor) is None
    calls = []
    original = type(image_processor).__call__
    monkeypatch.setattr(
        type(image_processor), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    items = [Image.new("RGB", (32, 32), (10, 20, 30)), Image.new("RGB", (32, 32), (200, 0, 90))]
    ours = with_processor(image_processor, processor)(images=items)["pixel_values"]
    assert calls, "the image processor was not called"
    assert torch.equal(ours, original(image_processor, images=items, return_tensors="pt")["pixel_values"])


def test_the_packages_image_processors_take_the_recipe(processor):
    """The tiny processor of the tests and the main job's (train.py's `ViTImageProcessorPil`) both take the recipe,
    which is what makes decoding cheap for training, the pipeline and the index alike; one that does not skips it
    silently (same pixels, slower), which this test would show."""
    from mqirtn_train.arguments import parse_args
    from mqirtn_train.model import build_model_and_processor

    _, main_processor, _ = build_model_and_processor(parse_args(["--vision_num_hidden_layers", "1"]))
    assert _resize_rescale_normalize_recipe(processor.image_processor) is not None
    assert _resize_rescale_normalize_recipe(main_processor.image_processor) is not None


def test_a_not_pil_backend_object_runs_itself(processor):
    class Duck:
        """Duck-typed image processor (not transformers' PIL backend)."""

        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.full((len(images), 3, 2, 2), 7.0)}

    assert _resize_rescale_normalize_recipe(Duck()) is None
    proc = MQIRTNProcessor.__new__(MQIRTNProcessor)
    proc.image_processor = Duck()
    assert torch.equal(proc._pixels([Image.new("RGB", (5, 5))], "images"), torch.full((1, 3, 2, 2), 7.0))
