"""Tiny random MQIRTN model + processor and generated images for the retrieval tests (pipeline, index, CLI, pictures)."""

import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor

from modeling_mqirtn import MQIRTNConfig, MQIRTNModel
from processing import MQIRTNProcessor


WORDS = ["make", "it", "red", "blue", "green", "add", "a", "small", "large", "circle", "square", "remove", "the"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
COLORS = [(230, 30, 30), (40, 70, 240), (30, 170, 50), (245, 225, 0), (150, 50, 200), (0, 210, 220)]


def tiny_model(seed: int = 0, projection_dim: int = 32) -> MQIRTNModel:
    torch.manual_seed(seed)
    vision = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    text = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config = MQIRTNConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=projection_dim, fusion_num_heads=4
    )
    return MQIRTNModel(config).eval()


def tiny_processor(folder) -> MQIRTNProcessor:
    vocab = Path(folder) / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return MQIRTNProcessor(ViTImageProcessor(size={"height": 32, "width": 32}), BertTokenizer(str(vocab)))


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
