"""transformers' own common tests on MQIRTN: `ModelTesterMixin` and `ConfigTester` on a tiny `MQIRTNModel` of every
composition variant, and `ProcessorTesterMixin` on `MQIRTNProcessor`, wired as transformers wires CLIP (a vision and a
text sub-tester; `additional_model_inputs`). The testers come from the installed transformers release's test modules
(tests/transformers_testers.py; scripts/install.sh unpacks them). A test that does not apply to a composed-retrieval
model is skipped by name below, with its reason; every other one runs.
"""

import os
import tempfile
import unittest

import pytest
import torch
from transformers import BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor

from modeling_mqirtn import COMPOSITIONS, MQIRTNConfig, MQIRTNModel
from processing import MQIRTNProcessor

from transformers_testers import REQUIRED, load, missing_reason


_MISSING = missing_reason()
if _MISSING is not None:
    if REQUIRED:
        raise RuntimeError(_MISSING)
    pytest.skip(_MISSING, allow_module_level=True)

modeling_common, configuration_common, processing_common = load()
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
ProcessorTesterMixin = processing_common.ProcessorTesterMixin
floats_tensor = modeling_common.floats_tensor
ids_tensor = modeling_common.ids_tensor
random_attention_mask = modeling_common.random_attention_mask


class MQIRTNVisionTester:
    """A ViT of 16 px images, patch 8 (4 patches + CLS), width 32, 2 layers."""

    def __init__(
        self,
        parent,
        batch_size=4,
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.seq_length = (image_size // patch_size) ** 2 + 1

    def get_config(self):
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )

    def prepare_config_and_inputs(self):
        shape = [self.batch_size, self.num_channels, self.image_size, self.image_size]
        return self.get_config(), floats_tensor(shape)

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class MQIRTNTextTester:
    """A BERT with a 99-token vocabulary, 7 tokens, width 24, 2 layers; masks padded on the right."""

    def __init__(
        self,
        parent,
        batch_size=4,
        seq_length=7,
        vocab_size=99,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size

    def get_config(self):
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        for row in range(self.batch_size):  # right padding: the first `row + 2` tokens are real
            attention_mask[row] = (torch.arange(self.seq_length) < min(row + 2, self.seq_length)).long()
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class MQIRTNModelTester:
    def __init__(self, parent, composition="mqirtn", is_training=True):
        self.parent = parent
        self.composition = composition
        self.vision_model_tester = MQIRTNVisionTester(parent)
        self.text_model_tester = MQIRTNTextTester(parent)
        self.batch_size = self.vision_model_tester.batch_size  # the batching-equivalence test reads it
        self.is_training = is_training

    def get_config(self):
        convolutional = self.composition in ("mqirtn", "composeae", "realspace_concat")
        return MQIRTNConfig.from_vision_text_configs(
            self.vision_model_tester.get_config(),
            self.text_model_tester.get_config(),
            projection_dim=16,
            fusion_num_heads=4,
            num_fusion_layers=2,
            fusion_intermediate_size=37,
            conv_channels=4 if convolutional else None,
            composition=self.composition,
        )

    def prepare_config_and_inputs_for_common(self):
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        _, input_ids, attention_mask = self.text_model_tester.prepare_config_and_inputs()
        _, target_pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        inputs = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_pixel_values": target_pixel_values,
            "return_loss": True,
        }
        return self.get_config(), inputs


class MQIRTNModelTestBase(ModelTesterMixin):
    all_model_classes = (MQIRTNModel,)
    composition = "mqirtn"
    additional_model_inputs = ["input_ids", "attention_mask", "target_pixel_values"]
    _is_composite = True
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = MQIRTNModelTester(self, composition=self.composition)
        self.config_tester = ConfigTester(
            self,
            config_class=MQIRTNConfig,
            has_text_modality=False,
            common_properties=["projection_dim", "logit_scale_init_value"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(
        reason="MQIRTNOutput names each tower's attentions (vision_tower_attentions, text_tower_attentions) and the "
        "fusion's; test_get_{image,text}_features_attentions check the towers'"
    )
    def test_attention_outputs(self):
        pass

    @unittest.skip(
        reason="MQIRTNOutput names each tower's hidden states (vision_hidden_states, text_hidden_states); "
        "test_get_{image,text}_features_hidden_states check them"
    )
    def test_hidden_states_output(self):
        pass

    @unittest.skip(
        reason="reads `outputs.hidden_states` / `outputs.attentions` of a single tower; MQIRTNOutput has one field "
        "per tower, checked by the get_*_features tests"
    )
    def test_retain_grad_hidden_states_attentions(self):
        pass


def _test_class(composition: str) -> type:
    name = "MQIRTN" + "".join(part.capitalize() for part in composition.split("_")) + "ModelTest"
    attributes = {"composition": composition, "__module__": __name__}
    if composition == "image_only":
        # The query is the reference image's embedding: the text tower runs (for `text_embeds`) but no loss term reads
        # it, so its parameters get no gradient. The gradient-checkpointing tests still compare every other gradient.
        attributes["test_all_params_have_gradient"] = False
    return type(name, (MQIRTNModelTestBase, unittest.TestCase), attributes)


for _composition in sorted(COMPOSITIONS):
    _cls = _test_class(_composition)
    globals()[_cls.__name__] = _cls
del _cls, _composition


VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "lower",
    "newer",
    "make",
    "it",
    "blue",
    "red",
    "with",
    "a",
    "dress",
    "shirt",
    "long",
    "short",
    "sleeves",
    "and",
    "the",
]


class MQIRTNProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = MQIRTNProcessor

    @classmethod
    def _setup_image_processor(cls):
        return ViTImageProcessor(size={"height": 32, "width": 32})

    @classmethod
    def _setup_tokenizer(cls):
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(VOCAB))
        return BertTokenizer(path)

    @unittest.skip(
        reason="a batch pairs one reference image with each text (same lengths); nested per-sample image lists and "
        "text-only samples inside an image batch are for processors that place image tokens in the text"
    )
    def test_processor_text_has_no_visual(self):
        pass

    def test_model_input_names(self):
        # The common test gives `images` and `text` only; `model_input_names` also lists `target_pixel_values`, which
        # comes from `target_images` (training batches): the same check with all three inputs.
        processor = self.get_processor()
        images = self.prepare_images_inputs()
        inputs = processor(text=self.prepare_text_inputs(), images=images, target_images=images, return_tensors="pt")
        self.assertSetEqual(set(inputs.keys()), set(processor.model_input_names))
