"""Shared helpers for the MQIRTN tests (`from utils import ...`; test modules never import each other): tiny ViT/BERT
configs, a tiny model and processor, random batches, generated images and dataset trees, and the tiny `train.py` runs.

Everything runs on CPU in a few milliseconds per forward pass: 32 px images, patch 8, width 32, two layers.
"""

import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage


REPO_ROOT = Path(__file__).resolve().parent.parent
# Excerpts of the real FashionIQ / CIRR annotation files (always here), and the full files where present (optional).
EXCERPT_FIXTURES = Path(__file__).resolve().parent / "fixtures"
FULL_FIXTURES = Path(os.environ.get("MQIRTN_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
ANNOTATION_FIXTURES = [
    pytest.param(EXCERPT_FIXTURES, id="excerpt"),
    pytest.param(
        FULL_FIXTURES, id="full",
        marks=pytest.mark.skipif(not FULL_FIXTURES.is_dir(), reason=f"optional: the full annotation files are not in {FULL_FIXTURES}"),
    ),
]  # fmt: skip

# Keep the shared 2-core machine usable and the timings stable.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor  # noqa: E402

from modeling_mqirtn import COMPOSITIONS, MQIRTNConfig, MQIRTNModel  # noqa: E402


ALL_COMPOSITIONS = sorted(COMPOSITIONS)

# Source for child processes that play a Hub user without this repository: our packages cannot be imported there,
# even where `scripts/install.sh` pip-installed them into the environment.
BLOCK_OUR_PACKAGES = """
import importlib.abc, sys
class _BlockOurPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_mqirtn", "processing", "mqirtn_app", "mqirtn_train"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _BlockOurPackages())
"""
IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
PROJECTION_DIM = 32
FUSION_HEADS = 4
TEXT_VOCAB_SIZE = 100
# The tiny tokenizer's vocabulary (ids 0..len-1 < TEXT_VOCAB_SIZE).
VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "make", "it", "change", "to", "a", "the", "blue", "red", "green", "yellow", "black", "white",
    "bigger", "smaller", "add", "remove", "circle", "square", "triangle", "left", "right", "top", "bottom",
    "with", "and", "no", "more", "less", "dress", "shirt", "sleeves", "long", "short", "dark", "light",
]  # fmt: skip
assert len(VOCAB) < TEXT_VOCAB_SIZE


def tiny_vision_config(**overrides) -> ViTConfig:
    """A ViT with 32 px images, patch 8 (16 patches + CLS), width 32, 2 layers."""
    kwargs = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def tiny_text_config(**overrides) -> BertConfig:
    """A BERT with a 100-token vocabulary, width 24 (unlike the vision tower's 32, so mixed-up widths fail), 2 layers."""
    kwargs = dict(
        vocab_size=TEXT_VOCAB_SIZE,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_config(composition: str = "mqirtn", **overrides) -> MQIRTNConfig:
    """An `MQIRTNConfig` over the tiny towers; `overrides` set MQIRTN fields."""
    kwargs = dict(
        vision_config=tiny_vision_config().to_dict(),
        text_config=tiny_text_config().to_dict(),
        projection_dim=PROJECTION_DIM,
        fusion_num_heads=FUSION_HEADS,
        num_fusion_layers=2,
        fusion_intermediate_size=64,
        conv_channels=4 if composition in ("mqirtn", "mqirtn_paper", "composeae", "realspace_concat") else None,
        composition=composition,
        # Fan-in-scaled init for the width-32 new layers (~ torch's default, 1/sqrt(3*32)): with the default 0.02 the
        # stacked MLPs of the complex composition start with outputs ~1e-5, the queries collapse onto the biases in the
        # first steps and `composeae` cannot fit 8 triples. At the paper's width 512, 0.02 ~ 1/sqrt(3*512) already.
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    return MQIRTNConfig(**kwargs)


def tiny_model(composition: str = "mqirtn", seed: int = 0, **overrides) -> MQIRTNModel:
    torch.manual_seed(seed)
    return MQIRTNModel(tiny_config(composition, **overrides))


def random_batch(batch_size: int = 4, seq_len: int = 7, seed: int = 0, with_targets: bool = True) -> dict:
    """Random distinct images and token ids; every row after the first has some right padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, len(VOCAB), (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = VOCAB.index("[CLS]")
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row in range(1, batch_size):
        length = max(2, seq_len - (row % (seq_len - 1)))  # between 2 and seq_len real tokens
        input_ids[row, length - 1] = VOCAB.index("[SEP]")
        input_ids[row, length:] = VOCAB.index("[PAD]")
        attention_mask[row, length:] = 0
    batch = {
        "pixel_values": torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }
    if with_targets:
        batch["target_pixel_values"] = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return batch


def write_vocab(folder) -> str:
    path = os.path.join(str(folder), "vocab.txt")
    with open(path, "w") as handle:
        handle.write("\n".join(VOCAB) + "\n")
    return path


def tiny_processor(folder):
    """An `MQIRTNProcessor` (32 px ViT image processor + BertTokenizer over `VOCAB`) built in `folder`."""
    from processing import MQIRTNProcessor

    image_processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    tokenizer = BertTokenizer(write_vocab(folder))
    return MQIRTNProcessor(image_processor=image_processor, tokenizer=tokenizer)


def one_error_line(capsys, prefix: str) -> str:
    """The one stderr line starting with `prefix` (exactly one, no traceback): a one-line error of a command."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------- images
SHAPE_COLORS = [(230, 30, 30), (40, 70, 240), (30, 170, 50), (245, 225, 0), (150, 50, 200), (0, 210, 220)]


def shape_image(index: int, size: int = 48):
    """A deterministic, visibly distinct image per index: a coloured shape on a grey background."""
    from PIL import Image, ImageDraw

    rng = random.Random(index)
    image = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(2, size // 2), rng.randint(2, size // 2)
    box = (x, y, x + size // 3 + rng.randint(0, 8), y + size // 3 + rng.randint(0, 8))
    color = SHAPE_COLORS[index % len(SHAPE_COLORS)]
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


# ---------------------------------------------------------------------------------------------------- train.py runs
# Tiny shapes data (32 px) and one tiny model: patch 8, hidden 32, 2 layers, text tower from scratch.
TRAIN_DATA_ARGS = [
    "--image_size", "32",
    "--shapes_num_train_queries", "64", "--shapes_num_validation_queries", "16", "--shapes_num_test_queries", "40",
    "--per_device_eval_batch_size", "16", "--num_results_grids", "0",
]  # fmt: skip
TINY_TRAIN_ARGS = [
    *TRAIN_DATA_ARGS, "--patch_size", "8",
    "--vision_hidden_size", "32", "--vision_num_hidden_layers", "2", "--vision_num_attention_heads", "2",
    "--text_from_scratch", "--text_hidden_size", "32", "--text_num_hidden_layers", "2", "--text_num_attention_heads", "2",
    "--projection_dim", "32", "--fusion_num_heads", "4",
    "--per_device_train_batch_size", "8", "--num_warmup_steps", "0", "--logging_steps", "1",
]  # fmt: skip


TRAIN_SCRIPT = REPO_ROOT / "train.py"


def run_train_script(argv: list[str], monkeypatch) -> int | str | None:
    """`python train.py *argv` in this process (run as `python` runs a script, `__main__`): its exit status (or the
    message `SystemExit` carries)."""
    monkeypatch.setattr(sys, "argv", [str(TRAIN_SCRIPT), *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    return stop.value.code


def train_env(cache_dir: Path) -> dict:
    """The environment of a `train.py` subprocess: this repository importable, data cached in `cache_dir`."""
    env = dict(os.environ)
    # One thread: several of these processes share two cores, and OpenMP spinning makes 2 threads far slower then.
    env.update(
        PYTHONPATH=str(REPO_ROOT), MQIRTN_CACHE=str(cache_dir), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    return env


def train_command(args: list[str], base: list[str] = TINY_TRAIN_ARGS, faults: list[str] | None = None) -> list[str]:
    """`python train.py *base *args`, or with `faults` (options of tests/train_with_faults.py) that script around it."""
    if faults is None:
        return [sys.executable, str(TRAIN_SCRIPT), *base, *args]
    return [sys.executable, str(REPO_ROOT / "tests" / "train_with_faults.py"), *faults, "--", *base, *args]


def run_train(
    args: list[str],
    cache_dir: Path,
    check: bool = True,
    base: list[str] = TINY_TRAIN_ARGS,
    faults: list[str] | None = None,
    **kwargs,
) -> subprocess.CompletedProcess:
    """`python train.py *base *args` in a subprocess (see `train_command`); raises with its stderr when `check` and it
    fails."""
    result = subprocess.run(
        train_command(args, base, faults),
        env=train_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_index_json(folder: Path, meta) -> None:
    """Writes a crafted `index.json` (a dict, str or bytes) into an index folder and signs it (its hash file), as a
    hand-made index would be: the field checks of `GalleryIndex.load` must catch it, not the edit check."""
    import hashlib

    data = meta if isinstance(meta, bytes) else (meta if isinstance(meta, str) else json.dumps(meta)).encode()
    (Path(folder) / "index.json").write_bytes(data)
    (Path(folder) / "index.json.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


# ---------------------------------------------------------------------------------------------------- dataset trees
def write_image(path: Path, color=(200, 30, 30), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (8, 8), color).save(path, format=fmt)


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")


def make_cirr(root: Path, image_root: Path) -> None:
    split_maps = {
        "val": {f"dev-{i}-0-img0": f"./dev/dev-{i}-0-img0.png" for i in range(5)},
        "test1": {f"test1-{i}-0-img0": f"./test1/test1-{i}-0-img0.png" for i in range(3)},
        "train": {f"train-{i}-0-img0": f"./train/{i % 2}/train-{i}-0-img0.png" for i in range(4)},
    }
    captions = {
        "val": [
            {"pairid": 1, "reference": "dev-0-0-img0", "target_hard": "dev-1-0-img0", "caption": "more dogs",
             "img_set": {"id": 1, "members": ["dev-0-0-img0", "dev-1-0-img0", "dev-2-0-img0"]}},
            {"pairid": 2, "reference": "dev-3-0-img0", "target_hard": "dev-2-0-img0", "caption": "at night",
             "img_set": {"id": 2, "members": ["dev-3-0-img0", "dev-2-0-img0", "dev-4-0-img0"]}},
            {"pairid": 3, "reference": "dev-4-0-img0", "target_hard": "dev-0-0-img0", "caption": "no cat",
             "img_set": {"id": 3, "members": ["dev-4-0-img0", "dev-0-0-img0"]}},
        ],
        "test1": [
            {"pairid": 7, "reference": "test1-0-0-img0", "caption": "two birds",
             "img_set": {"id": 1, "members": ["test1-0-0-img0", "test1-1-0-img0", "test1-2-0-img0"]}},
        ],
        "train": [
            {"pairid": 9, "reference": "train-0-0-img0", "target_hard": "train-1-0-img0", "caption": "a red car",
             "img_set": {"id": 1, "members": ["train-0-0-img0", "train-1-0-img0"]}},
            {"pairid": 10, "reference": "train-2-0-img0", "target_hard": "train-3-0-img0", "caption": "zoom in",
             "img_set": {"id": 2, "members": ["train-2-0-img0", "train-3-0-img0"]}},
        ],
    }  # fmt: skip
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir(parents=True)
    for split in split_maps:
        (root / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(split_maps[split]))
        (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(captions[split]))
        for name, relative in split_maps[split].items():
            if name == "dev-4-0-img0":
                continue  # missing
            if name == "dev-2-0-img0":
                write_corrupt(image_root / relative)
            else:
                write_image(image_root / relative)
