"""transformers conventions a Hub user relies on: input embeddings delegated to the text tower (so
`resize_token_embeddings` works), `return_dict` / `output_hidden_states`, the fusion following `attn_implementation`,
a one-sentence error for a checkpoint of another size, no flash-attention claim, and pretrained towers loading without
a report table for the pooler MQIRTN drops."""

import pytest
import torch
from transformers import BertModel, ViTModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_mqirtn import MQIRTNModel

from utils import TEXT_VOCAB_SIZE, random_batch, tiny_model, tiny_text_config, tiny_vision_config


def test_input_embeddings_are_the_text_towers_and_resize_token_embeddings_works(tmp_path):
    model = tiny_model().eval()
    assert model.get_input_embeddings() is model.text_model.get_input_embeddings()
    replacement = torch.nn.Embedding(TEXT_VOCAB_SIZE, model.config.text_config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.text_model.get_input_embeddings() is replacement

    model = tiny_model().eval()
    embeddings = model.resize_token_embeddings(TEXT_VOCAB_SIZE + 20)
    assert embeddings.weight.shape[0] == TEXT_VOCAB_SIZE + 20
    assert model.config.text_config.vocab_size == TEXT_VOCAB_SIZE + 20 == model.text_model.config.vocab_size
    batch = random_batch(2, with_targets=False)
    batch["input_ids"][:, 1] = TEXT_VOCAB_SIZE + 10  # a new token
    with torch.no_grad():
        query = model(**batch).query_embeds
    model.save_pretrained(tmp_path)
    reloaded = MQIRTNModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).query_embeds, query)


def test_return_dict_false_gives_the_tuple_and_hidden_states_are_the_towers():
    model = tiny_model().eval()
    batch = random_batch(3)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        as_tuple = model(**batch, return_loss=True, return_dict=False)
        with_states = model(**batch, output_hidden_states=True)
        vision = model.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states
        text = model.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(out.to_tuple())
    torch.testing.assert_close(as_tuple[0], out.loss)
    assert out.vision_hidden_states is None and out.text_hidden_states is None
    assert len(with_states.vision_hidden_states) == model.config.vision_config.num_hidden_layers + 1
    for got, expected in zip(with_states.vision_hidden_states + with_states.text_hidden_states, vision + text):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(with_states.query_embeds, out.query_embeds)
    model.config.return_dict = False  # the config default applies when the argument is not given
    with torch.no_grad():
        assert isinstance(model(**batch), tuple)
        query = model.get_query_features(**{k: v for k, v in batch.items() if k != "target_pixel_values"})
        image = model.get_image_features(pixel_values=batch["pixel_values"])
    assert isinstance(query, tuple) and isinstance(image, tuple)
    torch.testing.assert_close(query[0], out.query_embeds)  # `pooler_output` comes first
    torch.testing.assert_close(image[1], out.reference_embeds)  # after `last_hidden_state`


def count_sdpa_calls(model, batch, monkeypatch) -> int:
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        with torch.no_grad():
            model(**batch)
    return len(calls)


def test_fusion_follows_attn_implementation(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path)
    batch = random_batch(3, with_targets=False)
    eager = MQIRTNModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = MQIRTNModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    # Towers in eager never call SDPA, so every call counted is the fusion's: none in eager, one per attention in sdpa.
    assert count_sdpa_calls(eager, batch, monkeypatch) == 0
    fusion_attentions = 2 * sdpa.config.num_fusion_layers
    assert count_sdpa_calls(sdpa, batch, monkeypatch) >= fusion_attentions
    sdpa.set_attn_implementation("eager")
    assert count_sdpa_calls(sdpa, batch, monkeypatch) == 0
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch).query_embeds, eager(**batch).query_embeds)


def test_flash_attention_is_not_claimed(tmp_path):
    assert not MQIRTNModel._supports_flash_attn
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises((ValueError, ImportError)):
        MQIRTNModel.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_another_projection_dim_is_one_sentence_naming_the_field(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    logger = logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(logger) as captured, pytest.raises(ValueError) as error:
        MQIRTNModel.from_pretrained(tmp_path, projection_dim=64)
    message = str(error.value)
    assert "`projection_dim` (checkpoint: 32, this model: 64)" in message and "\n" not in message
    assert "ignore_mismatched_sizes=True" in message
    assert "LOAD REPORT" not in captured.out and "MISMATCH" not in captured.out
    # Asked for: the layers that do not fit are re-initialised, with the same sentence as a warning.
    model_logger = logging.get_logger("modeling_mqirtn.modeling_mqirtn")
    with CaptureLogger(model_logger) as warned:
        model = MQIRTNModel.from_pretrained(tmp_path, projection_dim=64, ignore_mismatched_sizes=True)
    assert model.image_projection.out_features == 64 and "`projection_dim` (checkpoint: 32" in warned.out


def test_pretrained_towers_load_without_a_pooler_report(tmp_path):
    torch.manual_seed(0)
    ViTModel(tiny_vision_config()).save_pretrained(tmp_path / "vit")  # with poolers, as on the Hub
    BertModel(tiny_text_config()).save_pretrained(tmp_path / "bert")
    logger = logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(logger) as captured:
        model = MQIRTNModel.from_vision_text_pretrained(
            str(tmp_path / "vit"), str(tmp_path / "bert"), projection_dim=32, fusion_num_heads=4, conv_channels=4
        )
    assert "LOAD REPORT" not in captured.out and "pooler" not in captured.out, captured.out
    assert model.text_model.pooler is None and model.vision_model.pooler is None
    assert type(model.text_model).__name__ == "BertModel" and isinstance(model.text_model, BertModel)


def test_output_attentions_follows_the_config_and_names_the_towers_and_the_fusions():
    model = tiny_model().eval()
    model.set_attn_implementation("eager")  # SDPA computes no attention weights
    batch = {k: v for k, v in random_batch(3).items() if k != "target_pixel_values"}
    config = model.config
    with torch.no_grad():
        plain = model(**batch)
        config.output_attentions = True  # no argument given: the config's value applies
        out = model(**batch)
        query = model.get_query_features(**batch)
        image = model.get_image_features(pixel_values=batch["pixel_values"])
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        asked_off = model(**batch, output_attentions=False)
    assert plain.image_attentions is None and plain.vision_tower_attentions is None
    assert plain.text_tower_attentions is None
    assert asked_off.vision_tower_attentions is None and asked_off.text_attentions is None
    tokens, length = 1 + (32 // 8) ** 2, batch["input_ids"].shape[1]
    assert len(out.image_attentions) == len(out.text_attentions) == config.num_fusion_layers
    assert len(out.vision_tower_attentions) == config.vision_config.num_hidden_layers
    assert len(out.text_tower_attentions) == config.text_config.num_hidden_layers
    assert out.vision_tower_attentions[0].shape == (3, config.vision_config.num_attention_heads, tokens, tokens)
    assert out.text_tower_attentions[0].shape == (3, config.text_config.num_attention_heads, length, length)
    assert out.image_attentions[0].shape == (3, config.fusion_num_heads, tokens, length)
    towers = out.vision_tower_attentions + out.text_tower_attentions
    for got, expected in zip(image.attentions + text.attentions, towers):
        torch.testing.assert_close(got, expected)
    for name in ("image_attentions", "text_attentions", "vision_tower_attentions", "text_tower_attentions"):
        for got, expected in zip(getattr(query, name), getattr(out, name)):
            torch.testing.assert_close(got, expected)
    torch.testing.assert_close(query.pooler_output, plain.query_embeds)
    torch.testing.assert_close(out.query_embeds, plain.query_embeds)  # the weights are returned, nothing else changes
