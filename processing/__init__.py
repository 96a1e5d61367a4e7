"""MQIRTN processing: the processor (Hub code) and the data code (datasets, transforms, protocols)."""

from transformers import AutoProcessor

from modeling_mqirtn import MQIRTNConfig

from .processing_mqirtn import MQIRTNProcessor, to_rgb_image


AutoProcessor.register(MQIRTNConfig, MQIRTNProcessor, exist_ok=True)
# `save_pretrained` then writes `auto_map` into processor_config.json and copies processing_mqirtn.py.
MQIRTNProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["MQIRTNProcessor", "to_rgb_image"]
# Data-code exports are appended below.
from .cir_datasets import (  # noqa: E402
    CIREvaluationData,
    SafeImageCollator,
    drop_undecodable_rows,
    from_hf_dataset,
    load_cir_dataset,
    load_cirr,
    load_fashion200k,
    load_fashioniq,
    load_files,
    load_hub_dataset,
    load_mitstates,
)
from .retrieval_metrics import cirr_submission, evaluate_protocol, recall_at_k  # noqa: E402
from .shapes import load_shapes, load_shapes_gallery, load_shapes_splits  # noqa: E402


__all__ += [
    "CIREvaluationData",
    "SafeImageCollator",
    "cirr_submission",
    "drop_undecodable_rows",
    "evaluate_protocol",
    "from_hf_dataset",
    "load_cir_dataset",
    "load_cirr",
    "load_fashion200k",
    "load_fashioniq",
    "load_files",
    "load_hub_dataset",
    "load_mitstates",
    "load_shapes",
    "load_shapes_gallery",
    "load_shapes_splits",
    "recall_at_k",
]
