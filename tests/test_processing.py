"""MQIRTNProcessor: outputs, image conversions, every input error, save/load, and use with the model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from processing import MQIRTNProcessor, to_rgb_image

from utils import IMAGE_SIZE, VOCAB, tiny_model


def solid(mode, size=(40, 30), color=None):
    defaults = {
        "RGB": (200, 10, 30),
        "L": 128,
        "RGBA": (10, 200, 30, 255),
        "CMYK": (0, 255, 255, 0),
        "P": 3,
        "I;16": 4000,
        "LA": (90, 255),
    }
    return Image.new(mode, size, defaults[mode] if color is None else color)


def test_outputs_shapes_and_types(processor):
    batch = processor(
        images=[solid("RGB"), solid("RGB", (64, 64))],
        text=["make it blue", "add a red circle to the left"],
        target_images=[solid("RGB"), solid("L")],
        return_tensors="pt",
    )
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "target_pixel_values"}
    assert batch["pixel_values"].shape == batch["target_pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 2
    # Padding to the longest text: the short one is padded and masked.
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum() == batch["input_ids"].shape[1]
    assert batch["input_ids"][0, 0].item() == VOCAB.index("[CLS]")
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert tokens == ["[CLS]", "make", "it", "blue", "[SEP]"]
    assert processor.model_input_names == ["pixel_values", "input_ids", "attention_mask", "target_pixel_values"]


def test_each_argument_alone(processor):
    assert set(processor(images=solid("RGB"))) == {"pixel_values"}
    assert set(processor(text="make it red")) == {"input_ids", "attention_mask"}
    assert set(processor(target_images=[solid("RGB")] * 3)) == {"target_pixel_values"}
    assert processor(images=solid("RGB"))["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_empty_modification_text_is_allowed(processor):
    batch = processor(images=[solid("RGB"), solid("RGB")], text=["", "make it blue"])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert tokens == ["[CLS]", "[SEP]"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA"])
def test_image_modes_become_rgb(processor, mode):
    image = solid(mode)
    converted = to_rgb_image(image)
    assert converted.mode == "RGB" and converted.size == image.size
    pixels = processor(images=image)["pixel_values"]
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(pixels).all()


def test_conversions_keep_colours():
    assert to_rgb_image(solid("L", color=77)).getpixel((0, 0)) == (77, 77, 77)
    # A fully transparent pixel is laid on white; an opaque one keeps its colour.
    assert to_rgb_image(solid("RGBA", color=(10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb_image(solid("RGBA", color=(10, 20, 30, 255))).getpixel((0, 0)) == (10, 20, 30)
    cyan = to_rgb_image(solid("CMYK", color=(255, 0, 0, 0))).getpixel((0, 0))
    assert cyan[0] < 10 and cyan[1] > 245 and cyan[2] > 245
    rgb = solid("RGB")
    assert to_rgb_image(rgb) is rgb


@pytest.mark.parametrize(
    "array",
    [
        np.full((20, 24, 3), 200, dtype=np.uint8),  # HWC uint8
        np.full((20, 24), 90, dtype=np.uint8),  # grayscale
        np.full((20, 24, 1), 90, dtype=np.uint8),  # single channel
        np.full((20, 24, 4), 90, dtype=np.uint8),  # RGBA
        np.full((3, 20, 24), 0.5, dtype=np.float32),  # CHW floats in [0, 1]
    ],
)
def test_numpy_images(processor, array):
    image = to_rgb_image(array)
    assert image.mode == "RGB" and image.size == (24, 20)
    assert processor(images=[array])["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_numpy_float_and_uint8_agree():
    floats = np.full((3, 8, 8), 0.5, dtype=np.float32)
    assert to_rgb_image(floats).getpixel((0, 0)) == (127, 127, 127)


def test_paths_load(processor, tmp_path):
    gray = tmp_path / "gray.png"
    solid("L", color=60).save(gray)
    rgba = tmp_path / "rgba.png"
    solid("RGBA").save(rgba)
    batch = processor(images=[str(gray), rgba], text=["make it blue", "make it red"], target_images=[gray, str(rgba)])
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(batch["pixel_values"], batch["target_pixel_values"])
    assert to_rgb_image(gray).getpixel((0, 0)) == (60, 60, 60)


def test_pixel_values_match_the_image_processor(processor):
    images = [solid("RGB"), solid("RGB", (50, 50), (0, 0, 255))]
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(images=images)["pixel_values"], expected)


# ---------------------------------------------------------------------------------------------- errors
def test_mismatched_lengths_name_arguments_and_lengths(processor):
    with pytest.raises(ValueError, match=r"`images` has 2, `text` has 3") as excinfo:
        processor(images=[solid("RGB")] * 2, text=["a", "b", "c"])
    assert "same length" in str(excinfo.value)
    with pytest.raises(ValueError, match=r"`images` has 2, `text` has 2, `target_images` has 1"):
        processor(images=[solid("RGB")] * 2, text=["a", "b"], target_images=[solid("RGB")])
    with pytest.raises(ValueError, match=r"`text` has 1, `target_images` has 2"):
        processor(text="make it blue", target_images=[solid("RGB")] * 2)


@pytest.mark.parametrize("argument", ["images", "text", "target_images"])
def test_empty_lists_name_the_argument(processor, argument):
    with pytest.raises(ValueError, match=rf"`{argument}` is an empty list"):
        processor(**{argument: []})


def test_nothing_given(processor):
    with pytest.raises(ValueError, match=r"at least one of `images`, `text` or `target_images`"):
        processor()


@pytest.mark.parametrize("argument", ["images", "target_images"])
def test_non_image_object_names_argument_position_and_type(processor, argument):
    with pytest.raises(
        ValueError,
        match=rf"`{argument}\[1\]` must be a PIL image, a numpy array, a path, a URL or a {{'bytes', 'path'}} dict, got int",
    ):
        processor(**{argument: [solid("RGB"), 42]})
    with pytest.raises(ValueError, match=rf"`{argument}\[0\]` must be .* got dict"):
        processor(**{argument: [{"image": 1}]})


def test_bad_numpy_shape_names_the_shape(processor):
    with pytest.raises(ValueError, match=r"`images\[0\]`: a numpy image must be .* got shape \(4, 5, 6, 7\)"):
        processor(images=[np.zeros((4, 5, 6, 7), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 2\)"):
        processor(images=np.zeros((8, 8, 2), dtype=np.uint8))


def test_missing_path_names_the_argument(processor, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match=r"`target_images\[0\]`: could not read the image .*nope.png"):
        processor(target_images=[missing])


def test_non_string_text_names_position_and_type(processor):
    with pytest.raises(ValueError, match=r"`text\[1\]` must be a string, got int"):
        processor(text=["make it blue", 3])
    with pytest.raises(ValueError, match=r"`text\[0\]` must be a string, got NoneType"):
        processor(images=[solid("RGB")], text=[None])


def test_only_pytorch_tensors(processor):
    with pytest.raises(ValueError, match=r"`return_tensors` must be 'pt'.*got 'np'"):
        processor(text="make it blue", return_tensors="np")


# ---------------------------------------------------------------------------------------------- round trips
def test_save_and_load_in_process(processor, tmp_path):
    folder = tmp_path / "saved"
    processor.save_pretrained(folder)
    for loaded in (MQIRTNProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)):
        assert type(loaded).__name__ == "MQIRTNProcessor"
        inputs = dict(
            images=[solid("RGB"), solid("L")], text=["make it blue", ""], target_images=[solid("CMYK"), solid("RGBA")]
        )
        expected, got = processor(**inputs), loaded(**inputs)
        assert set(expected) == set(got)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])


def test_processor_output_feeds_the_model(processor):
    model = tiny_model("mqirtn").eval()
    batch = processor(
        images=[solid("RGB"), solid("L"), np.zeros((20, 20, 3), dtype=np.uint8)],
        text=["make it blue", "", "add a red circle"],
        target_images=[solid("RGBA"), solid("CMYK"), solid("RGB")],
    )
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.query_embeds.shape == (3, 32) and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------- one decoder
def awkward_images() -> dict[str, Image.Image]:
    """Images that decoders disagree on: transparency (RGBA, palette with a transparent index) and 16-bit."""
    rgba = Image.new("RGBA", (40, 30), (200, 10, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent black
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 30, 200, 10] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 20, 30))
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    sixteen = Image.fromarray(np.tile(np.linspace(0, 60000, 40).astype(np.uint16), (30, 1)))
    return {"RGBA": rgba, "P": palette, "I;16": sixteen}


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16"])
def test_training_evaluation_and_pipeline_see_the_same_pixels(processor, tmp_path, mode):
    """The one-decoder rule: an image file gives identical `pixel_values` through the training transform and collator,
    the evaluation transforms train.py uses, and the pipeline's preprocessing."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from modeling_mqirtn import ComposedImageRetrievalPipeline
    from processing.data.transforms import (
        CIRQueryCollator,
        CIRTrainingCollator,
        collate_gallery,
        set_gallery_transform,
        set_query_transform,
        set_training_transform,
    )

    path = tmp_path / f"image_{mode.replace(';', '')}.png"
    awkward_images()[mode].save(path)
    assert Image.open(path).mode == mode
    rows = {"reference_image": [str(path)], "modification_text": ["make it blue"], "target_image": [str(path)]}
    features = Features(
        {"reference_image": ImageFeature(), "modification_text": Value("string"), "target_image": ImageFeature()}
    )
    dataset = Dataset.from_dict(rows, features=features)

    training = set_training_transform(dataset, processor, reference_id_column=None, target_id_column=None)
    train_batch = CIRTrainingCollator(processor.tokenizer)([training[0]])
    query_batch = CIRQueryCollator(processor.tokenizer)([set_query_transform(dataset, processor)[0]])
    gallery = Dataset.from_dict({"image": [str(path)]}, features=Features({"image": ImageFeature()}))
    gallery_batch = collate_gallery([set_gallery_transform(gallery, processor)[0]])
    pipe = ComposedImageRetrievalPipeline(model=tiny_model(), processor=processor)
    served = pipe.preprocess({"image": str(path), "text": "make it blue"})["pixel_values"]

    assert served.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    for name, pixels in (
        ("training reference", train_batch["pixel_values"]),
        ("training target", train_batch["target_pixel_values"]),
        ("evaluation query", query_batch["pixel_values"]),
        ("evaluation gallery", gallery_batch["pixel_values"]),
    ):
        assert torch.equal(pixels, served), f"{name} pixels differ from the pipeline's for a {mode} image"
    # The gallery index decodes with the same decoder: its embedding is the model's on the pipeline's pixels.
    from mqirtn_app.index import embed_images

    model = pipe.model
    indexed, kept, skipped = embed_images(model, processor, [str(path)], progress=False)
    assert kept == [0] and not skipped
    torch.testing.assert_close(
        indexed, model.get_image_features(pixel_values=served).pooler_output.detach(), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparent_pixels_are_white_in_training(processor, tmp_path, mode):
    """A fully transparent pixel is laid on white everywhere (a plain RGB conversion makes it black)."""
    from processing.data.transforms import decode_image

    path = tmp_path / "transparent.png"
    awkward_images()[mode].save(path)
    decoded = decode_image({"bytes": None, "path": str(path)})
    assert decoded.mode == "RGB" and decoded.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.getpixel((35, 5)) == ((200, 10, 30) if mode == "RGBA" else (30, 200, 10))


def test_undecodable_images_become_none_only_in_the_or_none_variant(tmp_path):
    from processing import ImageDecodeError, to_rgb_image_or_none

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert to_rgb_image_or_none(str(broken)) is None
    assert to_rgb_image_or_none({"bytes": b"nope", "path": None}) is None
    assert to_rgb_image_or_none(None) is None
    with pytest.raises(ImageDecodeError, match="could not read the image"):
        to_rgb_image(str(broken))
    with pytest.raises(ValueError, match="got int"):
        to_rgb_image_or_none(3)  # a wrong type is a mistake, not a file to skip
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format="PNG")
    assert to_rgb_image({"bytes": buffer.getvalue(), "path": None}).getpixel((0, 0)) == (1, 2, 3)


def test_processing_kwargs_flat_nested_and_common(processor):
    texts = ["make it blue", "add a red circle to the left"]
    default = processor(text=texts)
    assert default["input_ids"].shape[1] == default["attention_mask"][1].sum() < 12  # padded to the longest
    assert "token_type_ids" not in default
    flat = processor(text=texts, padding="max_length", max_length=12)
    nested = processor(text=texts, text_kwargs={"padding": "max_length", "max_length": 12})
    to_twelve = {"padding": "max_length", "max_length": 12}
    common = processor(text=texts, common_kwargs={"return_tensors": "pt"}, text_kwargs=to_twelve)
    for batch in (flat, nested, common):
        assert batch["input_ids"].shape == (2, 12)
        assert torch.equal(batch["input_ids"], flat["input_ids"])
    assert processor(text=texts, truncation=True, max_length=4)["input_ids"].shape == (2, 4)
    assert "token_type_ids" in processor(text=texts, return_token_type_ids=True)
    with pytest.raises(ValueError, match="passed two times"):
        processor(text=texts, padding="max_length", text_kwargs={"padding": "longest"})


def test_images_kwargs_reach_the_image_processor_for_references_and_targets(processor):
    image = solid("RGB", (40, 30))
    as_is = processor(images=[image], target_images=[image], do_resize=False)
    assert as_is["pixel_values"].shape == as_is["target_pixel_values"].shape == (1, 3, 30, 40)
    nested = processor(images=[image], images_kwargs={"do_normalize": False})
    assert 0.0 <= nested["pixel_values"].min() and nested["pixel_values"].max() <= 1.0  # rescaled, not normalized
    expected = processor.image_processor(images=[image], do_normalize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(nested["pixel_values"], expected)


def test_default_settings_take_the_fast_pixel_path(processor, monkeypatch):
    """Without `images_kwargs` the ViT recipe's pixels come from the lookup table (the image processor is not run);
    with them the image processor runs."""
    image = solid("RGB", (40, 30))
    expected = processor(images=[image])["pixel_values"]
    calls = []
    original = type(processor.image_processor).__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(processor.image_processor), "__call__", counting)
    assert torch.equal(processor(images=[image], return_tensors="pt")["pixel_values"], expected)
    assert calls == []
    processor(images=[image], do_resize=False)
    assert len(calls) == 1 and calls[0]["do_resize"] is False


def test_unknown_or_inapplicable_kwargs_are_refused_in_one_line(processor):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_lenght'\]"):
        processor(text=["make it blue"], max_lenght=4)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text=["make it blue"], text_kwargs={"return_tensors": "np"})
    with pytest.raises(ValueError, match="image placeholder"):
        processor(text=["make it blue"], return_mm_token_type_ids=True)


def test_saving_leaves_to_dict_equal_to_the_reloaded_processor(processor, tmp_path):
    before = processor.to_dict()
    processor.save_pretrained(tmp_path)
    reloaded = MQIRTNProcessor.from_pretrained(tmp_path)
    assert processor.to_dict() == before == reloaded.to_dict()
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_mqirtn.MQIRTNProcessor"}  # what remote loading reads
