"""MQIRTN model package: importing it registers the `mqirtn` model type with the Auto classes."""

from transformers import AutoConfig, AutoModel

from .configuration_mqirtn import COMPOSITIONS, LOSS_TYPES, MQIRTNConfig
from .modeling_mqirtn import MQIRTNModel, MQIRTNOutput, MQIRTNPreTrainedModel


AutoConfig.register("mqirtn", MQIRTNConfig, exist_ok=True)
AutoModel.register(MQIRTNConfig, MQIRTNModel, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the code files, so the folder loads with trust_remote_code.
MQIRTNConfig.register_for_auto_class()
MQIRTNModel.register_for_auto_class("AutoModel")

__all__ = ["COMPOSITIONS", "LOSS_TYPES", "MQIRTNConfig", "MQIRTNModel", "MQIRTNOutput", "MQIRTNPreTrainedModel"]
