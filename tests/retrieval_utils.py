"""Generated images for the retrieval tests (pipeline, index, CLI, pictures); the tiny model is conftest's."""

import random
from pathlib import Path

from PIL import Image, ImageDraw


COLORS = [(230, 30, 30), (40, 70, 240), (30, 170, 50), (245, 225, 0), (150, 50, 200), (0, 210, 220)]


def shape_image(index: int, size: int = 48) -> Image.Image:
    """A deterministic, visibly distinct image per index: a coloured shape on a grey background."""
    rng = random.Random(index)
    image = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(2, size // 2), rng.randint(2, size // 2)
    box = (x, y, x + size // 3 + rng.randint(0, 8), y + size // 3 + rng.randint(0, 8))
    color = COLORS[index % len(COLORS)]
    (draw.ellipse if index % 2 else draw.rectangle)(box, fill=color)
    return image


def write_image_folder(folder, count: int, nested: bool = True) -> list[Path]:
    """Writes `count` PNG/JPEG images (half in a sub-folder when `nested`); returns their paths in sorted order."""
    folder = Path(folder)
    paths = []
    for i in range(count):
        sub = folder / "sub" if nested and i % 2 else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"img_{i:03d}.png" if i % 3 else f"img_{i:03d}.jpg")
        shape_image(i).save(path)
        paths.append(path)
    return sorted(paths)
