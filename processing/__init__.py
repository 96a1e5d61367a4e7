"""MQIRTN processing: the processor (Hub code, `processing_mqirtn.py`) and, in `processing.data`, the data code.

Importing this package imports nothing; its names are imported on first access. The processor's names come from
`processing_mqirtn` (torch, transformers, PIL) and register `MQIRTNProcessor` with `AutoProcessor`, as `import
modeling_mqirtn` does; the data names (dataset registry, loaders, metrics) come from `processing.data.<module>`. So
`import processing.data.registry` imports neither torch nor transformers, and `from processing import MQIRTNProcessor`
never imports `datasets`.
"""

import importlib


_PROCESSOR_NAMES = ("IMAGE_EXTENSIONS", "ImageDecodeError", "MQIRTNProcessor", "to_rgb_image", "to_rgb_image_or_none")
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
    if name in _PROCESSOR_NAMES:
        import modeling_mqirtn  # noqa: F401  (registers MQIRTNProcessor with AutoProcessor, beside the model)

        value = getattr(importlib.import_module(f"{__name__}.processing_mqirtn"), name)
        globals()[name] = value
        return value
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PROCESSOR_NAMES) | set(_LAZY))


__all__ = [*_PROCESSOR_NAMES, *sorted(_LAZY)]
