"""MQIRTN processing: the processor (Hub code) and the data code (datasets, transforms, protocols)."""

from transformers import AutoProcessor

from modeling_mqirtn import MQIRTNConfig

from .processing_mqirtn import MQIRTNProcessor, to_rgb_image


AutoProcessor.register(MQIRTNConfig, MQIRTNProcessor, exist_ok=True)
# `save_pretrained` then writes `auto_map` into processor_config.json and copies processing_mqirtn.py.
MQIRTNProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["MQIRTNProcessor", "to_rgb_image"]
# Data-code exports are appended below.
