"""Pictures for composed image retrieval, drawn with PIL: a results grid and a cross-attention heatmap.

- `save_results_grid(path, reference_image, text, retrieved_images, scores, target_index=None, ...)`: the reference
  image with its modification text, then the top-k results with rank and score; the known target is outlined green.
- `save_attention_map(path, model, processor, image, text, ...)`: where the modification text looked in the reference
  image, from the fusion layers' text->image cross-attention (`MQIRTNOutput.text_attentions`).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from processing.processing_mqirtn import to_rgb_image_or_none


BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
TARGET = (0, 170, 60)
PLACEHOLDER = (215, 215, 215)
# Anchors of a perceptually ordered dark-purple -> red -> yellow colormap (after matplotlib's "inferno").
_COLORMAP = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _rgb(image) -> Image.Image | None:
    """Any image the processor reads (PIL image, array, path, `datasets` cell) -> RGB through its decoder
    (`to_rgb_image`, transparency on white); `None` or an unreadable file -> `None` (a 'missing' tile)."""
    return to_rgb_image_or_none(image)


def _thumbnail(image, size: int) -> Image.Image:
    """`image` fitted into a `size` x `size` square (aspect kept, centred); a grey 'missing' tile for `None`."""
    tile = Image.new("RGB", (size, size), PLACEHOLDER)
    image = _rgb(image)
    if image is None:
        ImageDraw.Draw(tile).text(
            (size // 2, size // 2), "missing", fill=MUTED, font=_font(max(10, size // 9)), anchor="mm"
        )
        return tile
    scale = size / max(image.size)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    tile.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return tile


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw, max_lines: int = 4) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels; at most `max_lines` lines (the last one ends with '...')."""
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = textwrap.shorten(lines[-1] + " ...", width=max(4, len(lines[-1])), placeholder="...")
    return lines or [""]


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> str:
    """`text` cut (with '...') to fit in `width` pixels on one line."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def results_grid(
    reference_image,
    text: str,
    retrieved_images: Sequence,
    scores: Sequence[float],
    target_index: int | None = None,
    ids: Sequence[str] | None = None,
    thumb_size: int = 160,
    columns: int | None = None,
    title: str | None = None,
) -> Image.Image:
    r"""
    The results grid as a PIL image (see `save_results_grid`).

    The picture is `(1 + columns) * (thumb_size + 2 * (thumb_size // 16)) + thumb_size // 4` pixels wide
    (reference column, arrow gap, `columns` result columns) and holds `ceil(k / columns)` rows of results.
    """
    k = len(retrieved_images)
    if k == 0:
        raise ValueError("`retrieved_images` is empty: there is nothing to draw")
    if len(scores) != k:
        raise ValueError(f"`scores` has {len(scores)} entries but `retrieved_images` has {k}")
    if ids is not None and len(ids) != k:
        raise ValueError(f"`ids` has {len(ids)} entries but `retrieved_images` has {k}")
    if target_index is not None and not 0 <= target_index < k:
        raise ValueError(
            f"`target_index` must be in [0, {k}) (a position in `retrieved_images`) or None, got {target_index}"
        )
    if thumb_size < 32:
        raise ValueError(f"`thumb_size` must be at least 32 pixels, got {thumb_size}")
    columns = min(k, 5) if columns is None else columns
    if columns < 1:
        raise ValueError(f"`columns` must be a positive integer, got {columns}")
    rows = -(-k // columns)

    pad, gap = thumb_size // 16, thumb_size // 4
    cell_w = thumb_size + 2 * pad
    font = _font(max(12, thumb_size // 10))
    small = _font(max(10, thumb_size // 13))
    line_h = font.size + 4 if hasattr(font, "size") else 16
    small_h = small.size + 3 if hasattr(small, "size") else 14
    caption_h = line_h + (small_h if ids is not None else 0) + pad
    header_h = line_h + pad
    title_h = line_h + pad if title else 0

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_lines = _wrap(f"\u201c{text}\u201d", font, thumb_size, measure, max_lines=6)
    reference_h = header_h + thumb_size + pad + len(text_lines) * line_h + pad
    results_h = header_h + rows * (thumb_size + caption_h + pad)
    width = (1 + columns) * cell_w + gap
    height = title_h + max(reference_h, results_h) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    top = title_h
    if title:
        draw.text((pad, pad // 2), _fit(title, font, width - 2 * pad, draw), fill=INK, font=font)
    # Reference column: header, image, modification text.
    draw.text((pad, top), "Query", fill=INK, font=font)
    canvas.paste(_thumbnail(reference_image, thumb_size), (pad, top + header_h))
    draw.rectangle((pad - 1, top + header_h - 1, pad + thumb_size, top + header_h + thumb_size), outline=INK, width=1)
    y = top + header_h + thumb_size + pad
    for line in text_lines:
        draw.text((pad, y), line, fill=INK, font=font)
        y += line_h
    # Arrow from the query to the results.
    x0, mid = cell_w + gap // 6, top + header_h + thumb_size // 2
    x1 = cell_w + gap - gap // 6
    draw.line((x0, mid, x1, mid), fill=MUTED, width=max(2, thumb_size // 40))
    draw.polygon([(x1, mid), (x1 - gap // 4, mid - gap // 5), (x1 - gap // 4, mid + gap // 5)], fill=MUTED)

    left = cell_w + gap
    draw.text((left + pad, top), f"Top {k} results", fill=INK, font=font)
    for position, (image, score) in enumerate(zip(retrieved_images, scores)):
        row, column = divmod(position, columns)
        x = left + column * cell_w + pad
        y = top + header_h + row * (thumb_size + caption_h + pad)
        canvas.paste(_thumbnail(image, thumb_size), (x, y))
        is_target = position == target_index
        outline = max(3, thumb_size // 24) if is_target else 1
        draw.rectangle(
            (x - outline, y - outline, x + thumb_size + outline - 1, y + thumb_size + outline - 1),
            outline=TARGET if is_target else MUTED,
            width=outline,
        )
        caption = f"#{position + 1}   {float(score):.3f}" + ("   target" if is_target else "")
        draw.text(
            (x, y + thumb_size + outline + 2),
            _fit(caption, font, thumb_size, draw),
            fill=TARGET if is_target else INK,
            font=font,
        )
        if ids is not None:
            draw.text(
                (x, y + thumb_size + outline + 2 + line_h),
                _fit(str(ids[position]), small, thumb_size, draw),
                fill=MUTED,
                font=small,
            )
    return canvas


def save_results_grid(
    path: str | os.PathLike,
    reference_image,
    text: str,
    retrieved_images: Sequence,
    scores: Sequence[float],
    target_index: int | None = None,
    ids: Sequence[str] | None = None,
    thumb_size: int = 160,
    columns: int | None = None,
    title: str | None = None,
) -> Image.Image:
    r"""
    Writes the "qualitative results" figure of a composed-retrieval query as a PNG and returns it.

    path (`str` or `os.PathLike`): where to write the PNG (parent folders are created).
    reference_image (PIL image, numpy array or path): the query's reference image.
    text (`str`): the modification text, shown under the reference image.
    retrieved_images (`list` of PIL images / paths / `None`): the results, best first (`None` draws a grey tile).
    scores (`list[float]`): their similarity scores.
    target_index (`int`, *optional*): position in `retrieved_images` of the known target; outlined green.
    ids (`list[str]`, *optional*): printed under each result.
    thumb_size (`int`, defaults to 160): side of each thumbnail in pixels.
    columns (`int`, *optional*): results per row (default `min(k, 5)`).
    title (`str`, *optional*): a line above everything.
    """
    image = results_grid(
        reference_image, text, retrieved_images, scores, target_index, ids, thumb_size, columns, title
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return image


# ---------------------------------------------------------------------------------------------------- attention
def _patch_grid(model, num_patches: int) -> tuple[int, int]:
    vision = model.config.vision_config
    image_size, patch_size = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if image_size is not None and patch_size is not None:
        sizes = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        patches = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
        grid = (sizes[0] // patches[0], sizes[1] // patches[1])
        if grid[0] * grid[1] == num_patches:
            return grid
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(
            f"cannot lay {num_patches} image tokens out as a patch grid; the vision tower is not ViT-like"
        )
    return side, side


@torch.no_grad()
def attention_maps(model, processor, image, text: str, layers: Sequence[int] | None = None) -> dict:
    r"""
    Where each word of `text` looked in `image`: the fusion layers' text->image cross-attention over the patches.

    For every text token, `MQIRTNOutput.text_attentions[layer]` (shape `(1, heads, L, 1 + P)`) is a distribution
    over the image tokens, so it says directly where that token looked. It is averaged over heads and `layers`
    (default: all fusion layers), the CLS slot is dropped and the rest renormalised to sum to 1 over the P patches;
    word pieces of one word are averaged; special tokens and padding are left out.

    Returns a dict: `words` (`list[str]`), `word_maps` (`np.ndarray` `(num_words, grid_h, grid_w)`), `map`
    (`np.ndarray` `(grid_h, grid_w)`, all words together), each map summing to 1.
    """
    batch = processor(images=[image], text=[text], return_tensors="pt")
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        out = model(
            pixel_values=batch["pixel_values"].to(parameter.device, parameter.dtype),
            input_ids=batch["input_ids"].to(parameter.device),
            attention_mask=batch["attention_mask"].to(parameter.device),
            output_attentions=True,
        )
    finally:
        model.train(was_training)
    if not out.text_attentions:
        raise ValueError(
            f"this model has no cross-attention fusion layers (composition={model.config.composition!r}, "
            f"num_fusion_layers={model.config.num_fusion_layers}); attention maps need composition='mqirtn'"
        )
    num_layers = len(out.text_attentions)
    layers = list(range(num_layers)) if layers is None else list(layers)
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"`layers` entries must be in [0, {num_layers}), got {layer}")
    attention = torch.stack([out.text_attentions[layer][0].float() for layer in layers]).mean(dim=(0, 1))  # (L, 1+P)
    patches = attention[:, 1:]
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    grid = _patch_grid(model, patches.shape[1])

    tokenizer = processor.tokenizer
    input_ids = batch["input_ids"][0].tolist()
    mask = batch["attention_mask"][0].tolist()
    # Out-of-vocabulary words ([UNK]) are words of the text too; only structural special tokens are left out.
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    content = [i for i, (token, m) in enumerate(zip(input_ids, mask)) if m and token not in special]
    groups: dict = {}
    word_ids = offsets = None
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer([text], return_token_type_ids=False, return_offsets_mapping=True)
        if encoding["input_ids"][0] == input_ids[: len(encoding["input_ids"][0])]:
            word_ids, offsets = encoding.word_ids(0), encoding["offset_mapping"][0]
    for position in content:
        key = word_ids[position] if word_ids is not None and word_ids[position] is not None else ("token", position)
        groups.setdefault(key, []).append(position)
    if offsets is not None:  # the words as written, also where the tokenizer only knows [UNK]
        words = [text[offsets[positions[0]][0] : offsets[positions[-1]][1]] for positions in groups.values()]
    else:
        words = [tokenizer.decode([input_ids[p] for p in positions]).strip() for positions in groups.values()]
    word_maps = (
        np.stack([patches[positions].mean(dim=0).reshape(grid).cpu().numpy() for positions in groups.values()])
        if groups
        else np.zeros((0, *grid))
    )
    rows = content or [i for i, m in enumerate(mask) if m]
    overall = patches[rows].mean(dim=0).reshape(grid).cpu().numpy()
    return {"words": words, "word_maps": word_maps, "map": overall}


def _colorize(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats (H, W) -> uint8 RGB (H, W, 3) through `_COLORMAP`."""
    positions = np.clip(values, 0.0, 1.0) * (len(_COLORMAP) - 1)
    low = np.floor(positions).astype(int).clip(0, len(_COLORMAP) - 2)
    fraction = (positions - low)[..., None]
    return (_COLORMAP[low] * (1 - fraction) + _COLORMAP[low + 1] * fraction).astype(np.uint8)


def _overlay(image: Image.Image, heat: np.ndarray, size: int, alpha: float) -> Image.Image:
    """`heat` (grid) min-max scaled, upsampled to `size` and blended over `image` resized as the model saw it."""
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.full_like(heat, 0.5)
    upsampled = Image.fromarray(scaled.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC)
    colors = Image.fromarray(_colorize(np.asarray(upsampled)))
    base = image.resize((size, size), Image.Resampling.BICUBIC)
    return Image.blend(base, colors, alpha)


def attention_figure(
    model,
    processor,
    image,
    text: str,
    layers: Sequence[int] | None = None,
    per_word: bool = True,
    panel_size: int = 224,
    alpha: float = 0.55,
    max_columns: int = 6,
) -> Image.Image:
    r"""
    The attention picture as a PIL image (see `save_attention_map`).

    The picture is `min(panels, max_columns) * (panel_size + 2 * (panel_size // 16))` pixels wide, where `panels`
    is 2 (reference, all words) plus one per word when `per_word`.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"`alpha` must be in (0, 1], got {alpha}")
    if panel_size < 64:
        raise ValueError(f"`panel_size` must be at least 64 pixels, got {panel_size}")
    maps = attention_maps(model, processor, image, text, layers)
    reference = _rgb(image)
    if reference is None:
        raise ValueError(f"`image` could not be read: {image!r}")
    uniform = 1.0 / maps["map"].size
    panels = [(reference.resize((panel_size, panel_size), Image.Resampling.BICUBIC), "reference image")]
    panels.append(
        (_overlay(reference, maps["map"], panel_size, alpha), f"all words (peak {maps['map'].max() / uniform:.2f}x)")
    )
    if per_word:
        for word, heat in zip(maps["words"], maps["word_maps"]):
            panels.append(
                (
                    _overlay(reference, heat, panel_size, alpha),
                    f"\u201c{word}\u201d (peak {heat.max() / uniform:.2f}x)",
                )
            )

    pad = panel_size // 16
    cell = panel_size + 2 * pad
    columns = min(len(panels), max_columns)
    rows = -(-len(panels) // columns)
    font = _font(max(12, panel_size // 15))
    small = _font(max(10, panel_size // 19))
    line_h = (font.size if hasattr(font, "size") else 12) + 5
    small_h = (small.size if hasattr(small, "size") else 10) + 4
    width = columns * cell
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = _wrap(f"Text -> image attention for \u201c{text}\u201d", font, width - 2 * pad, measure, max_lines=3)
    title_h = pad + len(title_lines) * line_h + small_h + pad
    legend_h = small_h + pad + max(8, panel_size // 20) + pad
    height = title_h + rows * (panel_size + line_h + pad) + legend_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=INK, font=font)
        y += line_h
    layer_text = "all fusion layers" if layers is None else f"fusion layers {list(layers)}"
    note = f"share of each word's attention per patch, {layer_text} and heads averaged; 'peak' = max patch vs uniform"
    draw.text((pad, y), _fit(note, small, width - 2 * pad, draw), fill=MUTED, font=small)
    for position, (panel, caption) in enumerate(panels):
        row, column = divmod(position, columns)
        x = column * cell + pad
        y = title_h + row * (panel_size + line_h + pad)
        canvas.paste(panel, (x, y))
        draw.text((x, y + panel_size + 3), _fit(caption, font, panel_size, draw), fill=INK, font=font)
    # Legend: the colour scale, low to high (each panel is scaled to its own range).
    bar_y = height - legend_h + pad
    bar_w, bar_h = min(width - 2 * pad, 3 * panel_size), max(8, panel_size // 20)
    gradient = _colorize(np.tile(np.linspace(0, 1, bar_w), (bar_h, 1)))
    canvas.paste(Image.fromarray(gradient), (pad, bar_y))
    draw.text((pad, bar_y + bar_h + 2), "low", fill=MUTED, font=small)
    draw.text((pad + bar_w, bar_y + bar_h + 2), "high (per panel)", fill=MUTED, font=small, anchor="ra")
    return canvas


def save_attention_map(
    path: str | os.PathLike,
    model,
    processor,
    image,
    text: str,
    layers: Sequence[int] | None = None,
    per_word: bool = True,
    panel_size: int = 224,
    alpha: float = 0.55,
) -> Image.Image:
    r"""
    Writes a PNG of where the modification text looked in the reference image, and returns it.

    Panels: the reference image (as the model sees it, resized square), the heatmap of all words together, and with
    `per_word` one heatmap per word. The heat is the fusion layers' text->image cross-attention
    (`MQIRTNOutput.text_attentions`: each text token's distribution over the image patches), averaged over heads and
    `layers` (default all). Each panel is scaled to its own range; its caption gives the peak patch's share relative
    to a uniform spread. Needs a model with fusion layers (`composition="mqirtn"`).

    path (`str` or `os.PathLike`): where to write the PNG. model, processor: an MQIRTN model and its processor.
    image (PIL image, numpy array or path), text (`str`): the query.
    layers (`list[int]`, *optional*): fusion layers to average. panel_size (`int`): side of each panel in pixels.
    alpha (`float`): heatmap opacity.
    """
    figure = attention_figure(model, processor, image, text, layers, per_word, panel_size, alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, format="PNG")
    return figure


def save_evaluation_grids(
    folder: str | os.PathLike,
    data,
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    count: int = 4,
    model=None,
    processor=None,
    top_k: int = 10,
) -> list[Path]:
    r"""
    Qualitative figures of an evaluation: for the first `count` queries of `data` (a `CIREvaluationData`) the
    reference, its text and the top-`top_k` gallery images with the target outlined (`query_{i}.png`); for a fusion
    model (with `model` and `processor` given), the first query's text->image attention map (`attention_0.png`).

    query_embeds (`torch.FloatTensor` of shape `(num_queries, projection_dim)`), gallery_embeds (`torch.FloatTensor` of
    shape `(gallery_size, projection_dim)`): L2-normalised, rows in the order of `data.queries` / `data.gallery`.

    Returns the paths written.
    """
    from datasets import Image as ImageFeature

    from modeling_mqirtn.search_mqirtn import exact_search

    count = min(count, len(data.queries))
    if count == 0:
        return []
    folder = Path(folder)
    _, ranking = exact_search(query_embeds[:count].float(), gallery_embeds.float(), top_k)
    gallery = data.gallery.cast_column("image", ImageFeature(decode=False))
    queries = data.queries.cast_column("reference_image", ImageFeature(decode=False))
    gallery_ids = list(data.gallery["image_id"])
    written = []
    for row in range(count):
        indices = [j for j in ranking[row].tolist() if j >= 0]
        ids = [gallery_ids[j] for j in indices]
        target = queries[row]["target_id"]
        path = folder / f"query_{row}.png"
        save_results_grid(
            path,
            queries[row]["reference_image"],
            queries[row]["modification_text"],
            [gallery[j]["image"] for j in indices],
            (query_embeds[row] @ gallery_embeds[indices].T).tolist(),
            target_index=ids.index(target) if target in ids else None,
            ids=ids,
        )
        written.append(path)
    if model is not None and processor is not None and model.config.uses_fusion:
        first = to_rgb_image_or_none(queries[0]["reference_image"])
        if first is not None:
            save_attention_map(folder / "attention_0.png", model, processor, first, queries[0]["modification_text"])
            written.append(folder / "attention_0.png")
    return written


__all__ = [
    "attention_figure",
    "attention_maps",
    "results_grid",
    "save_attention_map",
    "save_evaluation_grids",
    "save_results_grid",
]
