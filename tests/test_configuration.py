"""MQIRTNConfig: defaults, sub-configs of any model type, serialisation, and every validation error."""

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, BertConfig, ViTConfig

from modeling_mqirtn import COMPOSITIONS, LOSS_TYPES, MQIRTNConfig, MQIRTNModel

from utils import ALL_COMPOSITIONS, random_batch, tiny_config, tiny_text_config, tiny_vision_config


def test_defaults_follow_the_paper_and_composeae():
    config = MQIRTNConfig()
    assert config.model_type == "mqirtn"
    assert isinstance(config.vision_config, ViTConfig) and isinstance(config.text_config, BertConfig)
    assert config.projection_dim == 512 and config.num_fusion_layers == 2 and config.fusion_num_heads == 8
    assert config.composition == "mqirtn" and config.loss_type == "batch_based_classification"
    # One scale on the logits (s * cos) playing the role of ComposeAE/TIRG's s**2 (16 at their init 4); 20 measured best.
    assert config.logit_scale_init_value == 20.0
    weights = (
        config.base_loss_weight,
        config.reconstruction_image_loss_weight,
        config.reconstruction_text_loss_weight,
        config.symmetric_loss_weight,
    )
    assert weights == (1.0, 0.1, 0.1, 0.01)
    assert (
        config.composition_weights_init is None and config.conv_channels is None
    )  # the published defaults per variant
    assert config.rotation is True and config.angle_channel is True
    assert config.image_residual is None and config.uses_image_residual and config.composition_deviations is None
    assert (
        sorted(COMPOSITIONS)
        == sorted(ALL_COMPOSITIONS)
        == sorted(["mqirtn", "mqirtn_paper", "composeae", "tirg", "realspace_concat", "image_only", "text_only"])
    )
    paper = MQIRTNConfig(composition="mqirtn_paper")
    assert paper.uses_fusion and not paper.uses_image_residual  # MQIRTN as published: fusion, no image residual
    assert set(LOSS_TYPES) == {"batch_based_classification", "soft_triplet"}


def test_sub_configs_accept_config_objects_and_dicts():
    from_objects = MQIRTNConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(), projection_dim=32, fusion_num_heads=4
    )
    from_dicts = tiny_config()
    assert from_objects.vision_config.hidden_size == from_dicts.vision_config.hidden_size == 32
    assert from_objects.text_config.hidden_size == from_dicts.text_config.hidden_size == 24
    via_classmethod = MQIRTNConfig.from_vision_text_configs(
        tiny_vision_config(), tiny_text_config(), projection_dim=32, fusion_num_heads=4
    )
    assert via_classmethod.vision_config.to_dict() == from_objects.vision_config.to_dict()


def test_sub_configs_of_other_model_types_build_a_working_model():
    """Any AutoConfig model type: a CLIP vision tower and a RoBERTa text tower."""
    vision = AutoConfig.for_model(
        "clip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2,
    ).to_dict()  # fmt: skip
    text = AutoConfig.for_model(
        "roberta", vocab_size=100, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=40,
    ).to_dict()  # fmt: skip
    config = tiny_config(vision_config=vision, text_config=text)
    assert config.vision_config.model_type == "clip_vision_model" and config.text_config.model_type == "roberta"
    model = MQIRTNModel(config)
    assert type(model.vision_model).__name__ == "CLIPVisionModel" and type(model.text_model).__name__ == "RobertaModel"
    batch = random_batch(3)
    batch["input_ids"] = batch["input_ids"].clamp(min=3)  # RoBERTa: 1 is padding
    out = model(**batch, return_loss=True)
    assert out.query_embeds.shape == (3, 32) and out.loss.isfinite()


def test_json_round_trip(tmp_path):
    config = tiny_config("tirg", loss_type="soft_triplet", symmetric_loss_weight=0.5, logit_scale_bounds=[2.0, 50.0])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MQIRTNConfig
    for field in ("composition", "loss_type", "symmetric_loss_weight", "projection_dim", "fusion_num_heads"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert list(loaded.logit_scale_bounds) == [2.0, 50.0]
    assert loaded.vision_config.image_size == 32 and loaded.text_config.vocab_size == 100
    assert MQIRTNConfig.from_dict(config.to_dict()).to_dict()["text_config"]["hidden_size"] == 24


def test_auto_classes_are_registered():
    config = tiny_config()
    assert type(AutoConfig.for_model("mqirtn")) is MQIRTNConfig
    assert type(AutoModel.from_config(config)) is MQIRTNModel


def test_composition_spec_and_uses_fusion():
    for composition in ALL_COMPOSITIONS:
        config = tiny_config(composition)
        assert config.composition_spec == COMPOSITIONS[composition]
        assert config.uses_fusion == (composition in ("mqirtn", "mqirtn_paper"))
    assert not tiny_config("mqirtn", num_fusion_layers=0).uses_fusion


def _raises_naming(overrides: dict, *fragments: str):
    """The config error names the field and the value (and what is allowed, where given)."""
    with pytest.raises((ValueError, TypeError, StrictDataclassError)) as excinfo:
        tiny_config(**overrides)
    message = str(excinfo.value)
    if excinfo.value.__cause__ is not None:  # strict dataclasses wrap the validator's ValueError
        message += "\n" + str(excinfo.value.__cause__)
        assert isinstance(excinfo.value.__cause__, (ValueError, TypeError))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"composition": "clip"}, ["`composition`", "'clip'", "mqirtn", "realspace_concat"]),
        ({"loss_type": "triplet"}, ["`loss_type`", "'triplet'", "soft_triplet", "batch_based_classification"]),
        (
            {"projection_dim": 30, "fusion_num_heads": 4},
            ["`projection_dim`", "(30)", "`fusion_num_heads`", "(4)", "divisible"],
        ),
        ({"projection_dim": 0}, ["`projection_dim`", "got 0"]),
        ({"projection_dim": 2, "fusion_num_heads": 1}, ["`projection_dim`", "got 2", "at least 4"]),
        ({"fusion_num_heads": 0}, ["`fusion_num_heads`", "got 0"]),
        ({"conv_channels": -3}, ["`conv_channels`", "got -3"]),
        ({"num_fusion_layers": -1}, ["`num_fusion_layers`", "got -1", ">= 0"]),
        ({"fusion_intermediate_size": 0}, ["`fusion_intermediate_size`", "got 0"]),
        ({"fusion_dropout": 1.0}, ["`fusion_dropout`", "got 1.0", "[0, 1)"]),
        ({"fusion_pooling": "max"}, ["`fusion_pooling`", "'max'", "cls", "mean"]),
        ({"fusion_dropout": -0.1}, ["`fusion_dropout`", "got -0.1"]),
        ({"base_loss_weight": -1.0}, ["`base_loss_weight`", "got -1.0", ">= 0"]),
        ({"reconstruction_image_loss_weight": -0.1}, ["`reconstruction_image_loss_weight`", "got -0.1"]),
        ({"reconstruction_text_loss_weight": -2}, ["`reconstruction_text_loss_weight`", "got -2"]),
        ({"symmetric_loss_weight": -0.01}, ["`symmetric_loss_weight`", "got -0.01"]),
        ({"composition_weights_init": [1.0]}, ["`composition_weights_init`", "[1.0]", "two values"]),
        ({"logit_scale_bounds": [5.0, 1.0]}, ["`logit_scale_bounds`", "[5.0, 1.0]", "0 < low <= high"]),
        ({"logit_scale_bounds": [0.0, 10.0]}, ["`logit_scale_bounds`", "[0.0, 10.0]"]),
        ({"logit_scale_bounds": [1.0, 2.0, 3.0]}, ["`logit_scale_bounds`", "[1.0, 2.0, 3.0]"]),
        ({"logit_scale_init_value": 200.0}, ["`logit_scale_init_value`", "200.0", "[1.0, 100.0]"]),
        ({"projection_dim": "512"}, ["projection_dim", "'512'"]),
        ({"composition": 3}, ["composition", "3"]),
    ],
)
def test_invalid_values_raise_naming_field_and_value(overrides, fragments):
    _raises_naming(overrides, *fragments)


def test_sub_config_without_hidden_size_is_rejected():
    with pytest.raises((ValueError, TypeError, StrictDataclassError)) as excinfo:
        tiny_config(text_config={"model_type": "bert", "hidden_size": None})
    message = str(excinfo.value) + str(excinfo.value.__cause__)
    assert "hidden_size" in message and "None" in message, message


def test_errors_are_caught_as_value_error_cause():
    """Strict dataclasses wrap the validator; the original ValueError stays reachable for callers."""
    with pytest.raises(StrictDataclassError) as excinfo:
        tiny_config(composition="nope")
    assert isinstance(excinfo.value.__cause__, ValueError)
