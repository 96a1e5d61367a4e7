"""The results-grid and attention PNGs: they exist, have the documented size, are not blank, show what they claim."""

import numpy as np
import pytest
import torch
from PIL import Image

from mqirtn_app.visualization import (
    TARGET,
    attention_maps,
    save_attention_map,
    save_results_grid,
)

from utils import shape_image, tiny_model


def not_blank(image: Image.Image) -> bool:
    array = np.asarray(image.convert("RGB")).astype(np.float64)
    return array.std() > 10 and len(np.unique(array.reshape(-1, 3), axis=0)) > 50


def count_color(image: Image.Image, color) -> int:
    return int((np.asarray(image.convert("RGB")) == np.array(color, dtype=np.uint8)).all(axis=-1).sum())


@pytest.mark.parametrize("k, columns, thumb", [(5, None, 160), (7, 4, 96)])
def test_results_grid_png(tmp_path, k, columns, thumb):
    path = tmp_path / "sub" / "grid.png"
    retrieved = [shape_image(i) for i in range(k - 1)] + [None]  # a missing image draws a grey tile
    figure = save_results_grid(
        path, shape_image(42), "add a small red circle to the top left", retrieved, list(np.linspace(0.9, 0.4, k)),
        target_index=1, ids=[f"img_{i}.png" for i in range(k)], thumb_size=thumb, columns=columns,
    )  # fmt: skip
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == figure.size
        saved = saved.convert("RGB")
    used_columns = columns or min(k, 5)
    rows = -(-k // used_columns)
    assert saved.width == (1 + used_columns) * (thumb + 2 * (thumb // 16)) + thumb // 4
    assert saved.height > rows * thumb + 30  # header and captions
    assert not_blank(saved)
    # The target's green outline is there, and only when a target is given.
    assert count_color(saved, TARGET) > 4 * thumb
    plain = save_results_grid(tmp_path / "plain.png", shape_image(42), "it", retrieved, [0.5] * k, thumb_size=thumb,
                              columns=columns)  # fmt: skip
    assert count_color(plain, TARGET) == 0


def test_results_grid_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`scores` has 1 entries"):
        save_results_grid(tmp_path / "x.png", shape_image(0), "it", [shape_image(1), shape_image(2)], [0.3])
    with pytest.raises(ValueError, match="`target_index` must be in"):
        save_results_grid(tmp_path / "x.png", shape_image(0), "it", [shape_image(1)], [0.3], target_index=3)


def test_attention_maps_are_distributions_over_patches(model, processor):
    maps = attention_maps(model, processor, shape_image(3), "make it red")
    assert maps["words"] == ["make", "it", "red"]
    assert maps["word_maps"].shape == (3, 4, 4) and maps["map"].shape == (4, 4)  # 32 px / patch 8
    np.testing.assert_allclose(maps["word_maps"].sum(axis=(1, 2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps["map"], maps["word_maps"].mean(axis=0), atol=1e-6)
    # They are the model's text->image attention: averaged over heads and layers, CLS dropped, renormalised.
    batch = processor(images=[shape_image(3)], text=["make it red"])
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    attention = torch.stack([a[0] for a in out.text_attentions]).mean(dim=(0, 1))[1:4, 1:]  # the 3 word tokens
    expected = (attention / attention.sum(-1, keepdim=True)).reshape(3, 4, 4).numpy()
    np.testing.assert_allclose(maps["word_maps"], expected, atol=1e-6)
    # Out-of-vocabulary words keep their panel, labelled as written.
    assert attention_maps(model, processor, shape_image(3), "make it crimson")["words"] == ["make", "it", "crimson"]
    # A single layer differs from the average.
    assert not np.allclose(
        attention_maps(model, processor, shape_image(3), "make it red", layers=[0])["map"], maps["map"]
    )


def test_attention_png(model, processor, tmp_path):
    path = tmp_path / "attention.png"
    figure = save_attention_map(path, model, processor, shape_image(3), "make the circle green", panel_size=128)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == figure.size
        saved = saved.convert("RGB")
    panels = 2 + 4  # reference, all words, one per word
    assert saved.width == min(panels, 6) * (128 + 2 * (128 // 16))
    assert saved.height > 128 + 40
    assert not_blank(saved)
    words_only = save_attention_map(tmp_path / "all.png", model, processor, shape_image(3), "make it red",
                                    per_word=False, panel_size=128)  # fmt: skip
    assert words_only.width == 2 * (128 + 2 * (128 // 16))


def test_attention_needs_fusion_layers(processor, tmp_path):
    with pytest.raises(ValueError, match="no cross-attention fusion layers.*'tirg'"):
        save_attention_map(tmp_path / "x.png", tiny_model("tirg"), processor, shape_image(0), "make it red")
