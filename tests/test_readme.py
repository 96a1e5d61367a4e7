"""The README is a front door that keeps its promises: short, the two set-up commands CI runs, its code runs as written
(here against a tiny model saved where the main job saves its model), and every link in it and in docs/ leads to a
file that exists."""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from modeling_mqirtn import save_for_hub

from utils import REPO_ROOT, tiny_model, tiny_processor


README = REPO_ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section whose heading is `section` (up to the next `## ` heading)."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_readme_is_short_and_keeps_the_two_set_up_commands_ci_runs():
    text = README.read_text()
    assert len(text.splitlines()) <= 220
    assert "bash scripts/main.sh" in text and "bash scripts/test.sh" in text
    assert "bash scripts/test.sh" in (REPO_ROOT / ".ci" / "run").read_text()
    for section in ("Results", "Search backends", "Safety"):
        assert f"\n## {section}\n" in text


@pytest.mark.parametrize("document", ["README.md", *sorted(p.name for p in (REPO_ROOT / "docs").glob("*.md"))])
def test_relative_links_lead_to_files(document):
    path = README if document == "README.md" else REPO_ROOT / "docs" / document
    for target, _ in LINK.findall(path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{document} links to {target}, which does not exist"


@pytest.mark.slow
def test_the_readme_code_runs_as_written(tmp_path):
    """Both blocks of "Use a trained model", run in a folder that holds what they read: the model folder the main job
    writes (a tiny model here), a gallery of three images and a query image."""
    save_for_hub(tiny_model().eval(), tiny_processor(tmp_path), tmp_path / "outputs" / "mqirtn-shapes")
    (tmp_path / "gallery").mkdir()
    for i, color in enumerate(("red", "blue", "green")):
        Image.new("RGB", (40, 40), color).save(tmp_path / "gallery" / f"{i}.png")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "query.png")
    blocks = python_blocks("Use a trained model")
    assert len(blocks) == 2 and "embed_gallery" in blocks[0] and "get_query_features" in blocks[1]
    outputs = []
    for block in blocks:
        completed = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        outputs.append(completed.stdout)
    hits = [line.split() for line in outputs[0].splitlines() if line.startswith("gallery/")]
    assert len(hits) == 2 and all(-1.0 <= float(score) <= 1.0 for _, score in hits), outputs[0]


def test_the_quality_table_is_the_committed_grid_summary():
    """The README's results table is made from benchmarks/results/quality_grid.json (by `quality_shapes.py
    --update_readme`), never typed in: a figure there is a figure the grid measured."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "quality_shapes_for_readme", REPO_ROOT / "benchmarks" / "quality_shapes.py"
    )
    quality = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = quality
    spec.loader.exec_module(quality)
    summary = json.loads((REPO_ROOT / "benchmarks" / "results" / "quality_grid.json").read_text())
    assert not summary["quick"] and not summary["lr_grid"] and summary["split"] == "test"
    table = quality.readme_table((REPO_ROOT / "README.md").read_text())
    assert table is not None, "README.md has lost its quality-grid markers"
    assert table == quality.headline_table(summary)
