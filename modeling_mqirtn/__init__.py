"""MQIRTN model package: importing it registers the `mqirtn` model type with the Auto classes (AutoConfig, AutoModel,
AutoProcessor) and the `composed-image-retrieval` pipeline task."""

from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from processing.processing_mqirtn import MQIRTNProcessor  # noqa: I001  (the processor's Hub file: torch, transformers, PIL)

from .configuration_mqirtn import COMPOSITIONS, LOSS_TYPES, MQIRTNConfig
from .modeling_mqirtn import MQIRTNModel, MQIRTNOutput, MQIRTNPreTrainedModel, MQIRTNQueryOutput
from .pipeline_mqirtn import TASK as PIPELINE_TASK
from .pipeline_mqirtn import ComposedImageRetrievalPipeline, MQIRTNImageFeatureExtractionPipeline, save_for_hub


AutoConfig.register("mqirtn", MQIRTNConfig, exist_ok=True)
AutoModel.register(MQIRTNConfig, MQIRTNModel, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the code files, so the folder loads with trust_remote_code.
MQIRTNConfig.register_for_auto_class()
MQIRTNModel.register_for_auto_class("AutoModel")
AutoProcessor.register(MQIRTNConfig, MQIRTNProcessor, exist_ok=True)
# `save_pretrained` then writes `auto_map` into processor_config.json and copies processing_mqirtn.py.
MQIRTNProcessor.register_for_auto_class("AutoProcessor")
if PIPELINE_TASK not in PIPELINE_REGISTRY.supported_tasks:
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=ComposedImageRetrievalPipeline, pt_model=AutoModel, type="multimodal"
    )

__all__ = [
    "COMPOSITIONS",
    "LOSS_TYPES",
    "ComposedImageRetrievalPipeline",
    "MQIRTNConfig",
    "MQIRTNImageFeatureExtractionPipeline",
    "MQIRTNModel",
    "MQIRTNOutput",
    "MQIRTNQueryOutput",
    "MQIRTNPreTrainedModel",
    "save_for_hub",
]
