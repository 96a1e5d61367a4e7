"""MQIRTN processing: the processor (Hub code, `processing_mqirtn.py`) and, in `processing.data`, the data code.

Importing this package registers `MQIRTNProcessor` with `AutoProcessor` and imports nothing of the data code: the
data names below (dataset registry, loaders, metrics) are re-exported lazily, so `from processing import
MQIRTNProcessor` never imports `datasets`.
"""

import importlib

from transformers import AutoProcessor

from modeling_mqirtn import MQIRTNConfig

from .processing_mqirtn import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    MQIRTNProcessor,
    to_rgb_image,
    to_rgb_image_or_none,
)


AutoProcessor.register(MQIRTNConfig, MQIRTNProcessor, exist_ok=True)
# `save_pretrained` then writes `auto_map` into processor_config.json and copies processing_mqirtn.py.
MQIRTNProcessor.register_for_auto_class("AutoProcessor")

# Data-code names, imported from `processing.data.<module>` on first access.
_LAZY = {
    "CIREvaluationData": "loaders",
    "from_hf_dataset": "loaders",
    "load_evaluation_data": "loaders",
    "load_training_queries": "loaders",
    "DatasetSpec": "registry",
    "dataset_names": "registry",
    "get_dataset_spec": "registry",
    "cirr_submission": "metrics",
    "evaluate_protocol": "metrics",
    "recall_at_k": "metrics",
    "load_shapes": "shapes",
    "load_shapes_gallery": "shapes",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "MQIRTNProcessor",
    "to_rgb_image",
    "to_rgb_image_or_none",
    *sorted(_LAZY),
]
