"""MQIRTNModel: a tester mixin of check_*/test_* pairs that every composition variant runs, plus model-level checks.

Tiny towers (see conftest.py); the whole file runs in well under a minute on one core.
"""

import copy
import os
import re

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, ViTConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from modeling_mqirtn import COMPOSITIONS, MQIRTNConfig, MQIRTNModel, MQIRTNOutput
from modeling_mqirtn.composition_mqirtn import MQIRTN_DEVIATIONS
from modeling_mqirtn.configuration_mqirtn import COMPOSITION_DEVIATIONS
from modeling_mqirtn.losses_mqirtn import build_metric_loss, image_fingerprints

from utils import (
    ALL_COMPOSITIONS,
    FUSION_HEADS,
    NUM_PATCHES,
    PROJECTION_DIM,
    REPO_ROOT,
    random_batch,
    tiny_config,
    tiny_model,
)


# Parameters a variant legitimately never uses: `image_only` ignores the modification text entirely.
UNUSED_PARAMETER_PREFIXES = {"image_only": ("text_model.", "text_projection.")}


def in_batch_recall_at_1(model, batch) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits_per_query
    model.train(was_training)
    return (logits.argmax(dim=1) == torch.arange(len(logits))).float().mean().item()


def grad_norms(model) -> dict:
    return {
        name: (0.0 if param.grad is None else param.grad.abs().sum().item())
        for name, param in model.named_parameters()
        if param.requires_grad
    }


class MQIRTNModelTesterMixin:
    """Checks every composition variant must pass. Subclasses/parametrisation provide `composition`;
    `config_overrides` set extra MQIRTN fields for the whole class (e.g. another loss type)."""

    config_overrides: dict = {}

    def get_model(self, composition, seed=0, **overrides):
        return tiny_model(composition, seed=seed, **{**self.config_overrides, **overrides})

    # ------------------------------------------------------------------------------------------ shapes
    def check_output_shapes(self, composition, batch_size=4):
        model = self.get_model(composition)
        batch = random_batch(batch_size)
        out = model(**batch, return_loss=True)
        assert isinstance(out, MQIRTNOutput)
        for name in ("query_embeds", "target_embeds", "reference_embeds", "text_embeds"):
            embeds = getattr(out, name)
            assert embeds.shape == (batch_size, PROJECTION_DIM), name
            torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(batch_size), msg=f"{name} is not L2-normalised")
        assert out.logits_per_query.shape == (batch_size, batch_size)
        assert out.logit_scale.shape == ()
        torch.testing.assert_close(out.logits_per_query, out.logit_scale * out.query_embeds @ out.target_embeds.T)
        assert out.loss.shape == ()
        spec = COMPOSITIONS[composition]
        expected_terms = {"base"}
        if spec["complex"]:
            expected_terms.add("symmetric")
        if spec["reconstruction"]:
            expected_terms |= {"reconstruction_image", "reconstruction_text"}
        assert set(out.loss_terms) == expected_terms
        config = model.config
        weights = {
            "base": config.base_loss_weight,
            "symmetric": config.symmetric_loss_weight,
            "reconstruction_image": config.reconstruction_image_loss_weight,
            "reconstruction_text": config.reconstruction_text_loss_weight,
        }
        total = sum(weights[name] * term for name, term in out.loss_terms.items())
        torch.testing.assert_close(out.loss, total)
        # Without targets: queries only, no logits and no loss.
        queries_only = model(**{k: v for k, v in batch.items() if k != "target_pixel_values"})
        assert (
            queries_only.target_embeds is None and queries_only.logits_per_query is None and queries_only.loss is None
        )
        return out

    def test_output_shapes(self, composition):
        self.check_output_shapes(composition)

    def check_loss_finite(self, composition):
        out = self.get_model(composition)(**random_batch(4), return_loss=True)
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(term) for term in out.loss_terms.values())
        assert out.loss.item() > 0

    def test_loss_finite(self, composition):
        self.check_loss_finite(composition)

    # ------------------------------------------------------------------------------------------ gradients
    def check_all_used_parameters_get_gradient(self, composition):
        model = self.get_model(composition)
        model.train()
        model(**random_batch(4), return_loss=True).loss.backward()
        norms = grad_norms(model)
        unused_prefixes = UNUSED_PARAMETER_PREFIXES.get(composition, ())
        unused = {name for name in norms if name.startswith(unused_prefixes)}
        missing = sorted(name for name, norm in norms.items() if norm == 0.0 and name not in unused)
        assert not missing, f"{composition}: parameters without gradient: {missing}"
        if unused_prefixes:
            assert unused, f"{composition}: expected parameters under {unused_prefixes}"
            assert all(norms[name] == 0.0 for name in unused), f"{composition} should not use {unused_prefixes}"

    def test_all_used_parameters_get_gradient(self, composition):
        self.check_all_used_parameters_get_gradient(composition)

    def check_symmetric_constraint_gradient(self, composition):
        """With only the symmetric term weighted, the fusion/composition still learn through the conjugate path."""
        model = self.get_model(
            composition,
            base_loss_weight=0.0,
            reconstruction_image_loss_weight=0.0,
            reconstruction_text_loss_weight=0.0,
            symmetric_loss_weight=1.0,
        )
        out = model(**random_batch(4), return_loss=True)
        if not COMPOSITIONS[composition]["complex"]:
            assert "symmetric" not in out.loss_terms
            assert out.loss.item() == 0.0  # every weighted term is off
            return
        torch.testing.assert_close(out.loss, out.loss_terms["symmetric"])
        out.loss.backward()
        norms = grad_norms(model)
        # Only the decoders (and, with fusion, psi(t)'s projection: fusion reads the text tokens) are outside the
        # symmetric path; everything else, towers included, must learn from it.
        outside = ("image_decoder.", "text_decoder.") + (("text_projection.",) if model.fusion is not None else ())
        no_grad = {name for name, norm in norms.items() if norm == 0.0}
        expected = {name for name in norms if name.startswith(outside)}
        assert no_grad == expected, f"unexpected (missing) gradients: {sorted(no_grad ^ expected)}"
        assert any(name.startswith("composition.") for name in norms)
        if COMPOSITIONS[composition]["fusion"]:
            assert any(name.startswith("fusion.") for name in norms)

    def test_symmetric_constraint_gradient(self, composition):
        self.check_symmetric_constraint_gradient(composition)

    # ------------------------------------------------------------------------------------------ features
    def check_query_features_match_forward(self, composition):
        model = self.get_model(composition).eval()
        batch = random_batch(5)
        with torch.no_grad():
            out = model(**batch, return_loss=True)
            queries = model.get_query_features(
                batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
            ).pooler_output
            images = model.get_image_features(batch["target_pixel_values"]).pooler_output
            references = model.get_image_features(batch["pixel_values"]).pooler_output
            texts = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        torch.testing.assert_close(queries, out.query_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(images, out.target_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(references, out.reference_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(texts, out.text_embeds, atol=1e-6, rtol=0)
        if composition == "image_only":
            torch.testing.assert_close(queries, references, atol=1e-6, rtol=0)
        if composition == "text_only":
            torch.testing.assert_close(queries, texts, atol=1e-6, rtol=0)

    def test_query_features_match_forward(self, composition):
        self.check_query_features_match_forward(composition)

    def check_batch_sizes_1_and_7(self, composition):
        """Batch size is never hard-coded and rows do not leak into each other (eval mode)."""
        model = self.get_model(composition).eval()
        batch = random_batch(7)
        with torch.no_grad():
            out7 = model(**batch, return_loss=True)
            assert out7.query_embeds.shape == (7, PROJECTION_DIM) and out7.logits_per_query.shape == (7, 7)
            assert torch.isfinite(out7.loss)
            for row in (0, 6):
                single = {name: value[row : row + 1] for name, value in batch.items()}
                out1 = model(**single, return_loss=True)
                assert out1.query_embeds.shape == (1, PROJECTION_DIM) and out1.logits_per_query.shape == (1, 1)
                assert torch.isfinite(out1.loss)
                torch.testing.assert_close(out1.query_embeds, out7.query_embeds[row : row + 1], atol=1e-5, rtol=0)
                torch.testing.assert_close(out1.target_embeds, out7.target_embeds[row : row + 1], atol=1e-5, rtol=0)

    def test_batch_sizes_1_and_7(self, composition):
        self.check_batch_sizes_1_and_7(composition)

    # ------------------------------------------------------------------------------------------ serialisation
    def check_save_load_round_trip(self, composition, tmp_path):
        model = self.get_model(composition).eval()
        # Move the learnable scalars away from their init so a re-initialisation on load would show.
        with torch.no_grad():
            model.logit_scale.fill_(7.25)
            for name, param in model.named_parameters():
                if name.endswith("mapping_weights") or name == "image_residual.weight":
                    param.add_(0.5)
        model.save_pretrained(tmp_path)
        files = set(os.listdir(tmp_path))
        assert "model.safetensors" in files and "config.json" in files
        assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files), files
        loaded = MQIRTNModel.from_pretrained(tmp_path).eval()
        assert loaded.config.composition == composition
        for tower in ("vision_config", "text_config"):
            saved, restored = model.config.to_dict()[tower], loaded.config.to_dict()[tower]
            assert {k: saved[k] for k in ("model_type", "hidden_size", "num_hidden_layers")} == {
                k: restored[k] for k in ("model_type", "hidden_size", "num_hidden_layers")
            }
        original_state, loaded_state = model.state_dict(), loaded.state_dict()
        assert original_state.keys() == loaded_state.keys()
        for name, tensor in original_state.items():
            assert torch.equal(tensor, loaded_state[name]), name
        batch = random_batch(4, seed=3)
        with torch.no_grad():
            before, after = model(**batch, return_loss=True), loaded(**batch, return_loss=True)
        for name in ("query_embeds", "target_embeds", "logits_per_query", "loss"):
            assert (getattr(before, name) - getattr(after, name)).abs().max().item() <= 1e-5, name

    def test_save_load_round_trip(self, composition, tmp_path):
        self.check_save_load_round_trip(composition, tmp_path)

    # ------------------------------------------------------------------------------------------ training
    def check_overfits_one_batch(self, composition, max_steps=200):
        """8 distinct (reference, text, target) triples: in-batch R@1 reaches 1.0, and the logit scale learns."""
        model = self.get_model(composition, seed=1)
        model.train()
        batch = random_batch(8, seed=11)
        assert len({tuple(row.tolist()) for row in image_fingerprints(batch["target_pixel_values"])[:, None]}) == 8
        scale = [model.logit_scale]
        others = [param for name, param in model.named_parameters() if name != "logit_scale"]
        optimizer = torch.optim.AdamW(
            [{"params": others, "lr": 1e-3}, {"params": scale, "lr": 0.1, "weight_decay": 0.0}]
        )
        initial_scale = model.logit_scale.item()
        recall, first_loss = 0.0, None
        for step in range(1, max_steps + 1):
            loss = model(**batch, return_loss=True).loss
            first_loss = loss.item() if first_loss is None else first_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                recall = in_batch_recall_at_1(model, batch)
                if recall == 1.0:
                    break
        assert recall == 1.0, f"{composition}: in-batch R@1 {recall} after {step} steps"
        assert model.logit_scale.item() != initial_scale, "the logit scale did not train"
        assert model(**batch, return_loss=True).loss.item() < first_loss

    def test_overfits_one_batch(self, composition):
        self.check_overfits_one_batch(composition)

    def check_bf16_autocast(self, composition):
        model = self.get_model(composition)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**random_batch(4), return_loss=True)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        assert grads and all(torch.isfinite(grad).all() for grad in grads)
        assert all(param.dtype == torch.float32 for param in model.parameters())

    def test_bf16_autocast(self, composition):
        self.check_bf16_autocast(composition)

    def check_activation_checkpointing(self, composition):
        """Same gradients with and without checkpointing, and the layers are really recomputed in backward."""
        reference = self.get_model(composition).train()
        checkpointed = copy.deepcopy(reference)
        checkpointed.activation_checkpointing_enable()
        batch = random_batch(4)
        calls = {"vision": 0, "fusion": 0}

        def counter(key):
            def hook(module, args, output):
                calls[key] += 1

            return hook

        # Hooks on a module *inside* a layer: transformers checkpoints `forward`, so the layer's own hooks run once.
        vision_layer = next(
            m for m in checkpointed.vision_model.modules() if isinstance(m, GradientCheckpointingLayer)
        )
        next(vision_layer.children()).register_forward_hook(counter("vision"))
        if checkpointed.fusion is not None:
            checkpointed.fusion.layers[0].image_norm.register_forward_hook(counter("fusion"))
        # Same dropout masks in both runs (the baselines have ComposeAE's dropout 0.5).
        torch.manual_seed(0)
        reference(**batch, return_loss=True).loss.backward()
        torch.manual_seed(0)
        loss = checkpointed(**batch, return_loss=True).loss
        forward_calls = dict(calls)
        loss.backward()
        assert calls["vision"] > forward_calls["vision"], "vision layers were not recomputed: checkpointing is off"
        if checkpointed.fusion is not None:
            assert calls["fusion"] > forward_calls["fusion"], "fusion layers were not recomputed"
        expected = dict(reference.named_parameters())
        for name, param in checkpointed.named_parameters():
            if expected[name].grad is None:
                assert param.grad is None or not param.grad.any(), name
                continue
            torch.testing.assert_close(param.grad, expected[name].grad, atol=1e-5, rtol=1e-4, msg=name)

    def test_activation_checkpointing(self, composition):
        self.check_activation_checkpointing(composition)

    def check_sdpa_matches_eager(self, composition, tmp_path):
        self.get_model(composition).save_pretrained(tmp_path)
        eager = MQIRTNModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
        sdpa = MQIRTNModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        for tower in ("vision_model", "text_model"):
            assert getattr(eager, tower).config._attn_implementation == "eager"
            assert getattr(sdpa, tower).config._attn_implementation == "sdpa"
        batch = random_batch(4)  # rows with padding exercise the masks
        with torch.no_grad():
            out_eager, out_sdpa = eager(**batch, return_loss=True), sdpa(**batch, return_loss=True)
        for name in ("query_embeds", "target_embeds", "text_embeds", "loss"):
            torch.testing.assert_close(getattr(out_sdpa, name), getattr(out_eager, name), atol=1e-5, rtol=1e-5)

    def test_sdpa_matches_eager(self, composition, tmp_path):
        self.check_sdpa_matches_eager(composition, tmp_path)

    def check_attentions(self, composition):
        model = self.get_model(composition).eval()
        batch = random_batch(4)
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
            plain = model(**batch)
        # The weights path (manual softmax) and the SDPA path give the same queries.
        torch.testing.assert_close(out.query_embeds, plain.query_embeds, atol=1e-5, rtol=0)
        if model.fusion is None:
            assert out.image_attentions is None and out.text_attentions is None
            return
        batch_size, length = batch["input_ids"].shape
        tokens = 1 + NUM_PATCHES
        mask = batch["attention_mask"].bool()
        assert (~mask).any(), "the batch must contain padding for this check"
        assert len(out.image_attentions) == len(out.text_attentions) == model.config.num_fusion_layers
        for image_to_text, text_to_image in zip(out.image_attentions, out.text_attentions):
            assert image_to_text.shape == (batch_size, FUSION_HEADS, tokens, length)
            assert text_to_image.shape == (batch_size, FUSION_HEADS, length, tokens)
            torch.testing.assert_close(image_to_text.sum(-1), torch.ones(batch_size, FUSION_HEADS, tokens))
            torch.testing.assert_close(text_to_image.sum(-1), torch.ones(batch_size, FUSION_HEADS, length))
            padding = (~mask)[:, None, None, :].expand_as(image_to_text)
            assert (image_to_text[padding] == 0).all(), "padding tokens received attention"
            assert (image_to_text[~padding] > 0).all()

    def test_attentions(self, composition):
        self.check_attentions(composition)


@pytest.mark.parametrize("composition", ALL_COMPOSITIONS)
class TestMQIRTNCompositions(MQIRTNModelTesterMixin):
    """Every variant with the default loss (batch-based classification)."""


@pytest.mark.parametrize("composition", ["mqirtn", "tirg"])
class TestMQIRTNSoftTriplet(MQIRTNModelTesterMixin):
    """The soft-triplet loss through the same checks (two variants keep the suite short)."""

    config_overrides = {"loss_type": "soft_triplet"}


# ---------------------------------------------------------------------------------------------- model-level checks
def test_fusion_off_when_zero_layers_and_for_non_fusion_variants():
    assert tiny_model("mqirtn", num_fusion_layers=0).fusion is None
    assert tiny_model("mqirtn").fusion is not None
    for composition in ALL_COMPOSITIONS:
        model = tiny_model(composition)
        assert (model.fusion is not None) == COMPOSITIONS[composition]["fusion"]
        assert (model.image_decoder is not None) == COMPOSITIONS[composition]["reconstruction"]
        assert (model.image_residual is not None) == (composition == "mqirtn")
    assert tiny_model("mqirtn", image_residual=False).image_residual is None
    assert tiny_model("mqirtn_paper", image_residual=True).image_residual is not None
    for composition in ("composeae", "tirg"):
        with pytest.raises(Exception, match="image_residual=True"):
            tiny_config(composition, image_residual=True)
        assert tiny_model(composition, image_residual=False).image_residual is None


def test_fusion_pooling_mean_pools_every_fused_image_token():
    batch = random_batch(3)
    cls_model = tiny_model("mqirtn").eval()
    mean_model = tiny_model("mqirtn", fusion_pooling="mean").eval()
    assert mean_model.config.fusion_pooling == "mean" and cls_model.config.fusion_pooling == "cls"
    mean_model.load_state_dict(cls_model.state_dict())  # same weights: only the pooling differs
    captured = {}
    last_layer = mean_model.fusion.layers[-1]

    def keep_image_tokens(module, args, output):
        captured.setdefault("image_tokens", output[0])  # returns None: the output is left as it is

    handle = last_layer.register_forward_hook(keep_image_tokens)
    with torch.no_grad():
        mean_query = mean_model(**batch).query_embeds
        cls_query = cls_model(**batch).query_embeds
    handle.remove()
    assert not torch.allclose(mean_query, cls_query, atol=1e-4)
    tokens = captured["image_tokens"]  # (B, 1 + patches, d) after the last fusion layer
    with torch.no_grad():
        expected = mean_model.fusion.image_output_norm(tokens.mean(dim=1))
        fused_image, _, _, _ = mean_model.fusion(
            mean_model._image_tokens(batch["pixel_values"]),
            mean_model._text_tokens(batch["input_ids"], batch["attention_mask"]),
            batch["attention_mask"],
        )
    torch.testing.assert_close(fused_image, expected)


def test_image_residual_starts_query_at_reference():
    """The MQIRTN query has an identity path to phi(x); turning it off changes the query."""
    batch = random_batch(4)
    with_residual = tiny_model("mqirtn").eval()
    without = tiny_model("mqirtn", image_residual=False).eval()
    without.load_state_dict(
        {k: v for k, v in with_residual.state_dict().items() if not k.startswith("image_residual.")}
    )
    with torch.no_grad():
        q_with, q_without = with_residual(**batch).query_embeds, without(**batch).query_embeds
        reference = with_residual(**batch).reference_embeds
    assert not torch.allclose(q_with, q_without, atol=1e-4)
    # The residual pulls every query towards its own reference embedding.
    assert ((q_with * reference).sum(-1) > (q_without * reference).sum(-1)).all()


def test_forward_input_errors():
    model = tiny_model("mqirtn")
    batch = random_batch(4)
    with pytest.raises(ValueError, match=r"`pixel_values` and `input_ids` must have the same batch size, got 3 and 4"):
        model(pixel_values=batch["pixel_values"][:3], input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match=r"`target_pixel_values` and `pixel_values`.*got 2 and 4"):
        model(**{**batch, "target_pixel_values": batch["target_pixel_values"][:2]})
    with pytest.raises(ValueError, match=r"`return_loss=True` needs `target_pixel_values`"):
        model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], return_loss=True)
    with pytest.raises(
        ValueError, match=r"`attention_mask` must have the shape of `input_ids` \(4, 7\), got \(4, 6\)"
    ):
        model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"][:, :6],
        )
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \(batch, channels, height, width\)"):
        model(pixel_values=batch["pixel_values"][0], input_ids=batch["input_ids"][:3])
    with pytest.raises(ValueError, match=r"needs both `pixel_values`"):
        model(input_ids=batch["input_ids"])


def test_attention_mask_defaults_to_ones():
    model = tiny_model("mqirtn").eval()
    batch = random_batch(3)
    full = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        implicit = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).query_embeds
        explicit = model(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=full
        ).query_embeds
        padded = model(**{k: v for k, v in batch.items() if k != "target_pixel_values"}).query_embeds
    torch.testing.assert_close(implicit, explicit)
    assert not torch.allclose(padded[1:], explicit[1:], atol=1e-4), "the attention mask must matter"


def test_duplicate_targets_in_forward_are_masked():
    """Two identical target images: the model's base loss equals the loss with the duplicate column removed."""
    model = tiny_model("tirg").eval()
    batch = random_batch(5)
    batch["target_pixel_values"][3] = batch["target_pixel_values"][1]
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    logits = out.logit_scale * out.query_embeds @ out.target_embeds.T
    expected = []
    for row in range(5):
        keep = [col for col in range(5) if {row, col} != {1, 3}]
        expected.append(F.cross_entropy(logits[row, keep][None], torch.tensor([keep.index(row)])))
    torch.testing.assert_close(out.loss_terms["base"], torch.stack(expected).mean(), atol=1e-5, rtol=0)
    # Without masking (explicit distinct ids) the loss differs: the mask really acted.
    with torch.no_grad():
        unmasked = model(**batch, return_loss=True, target_ids=torch.arange(5), reference_ids=torch.arange(5))
    assert not torch.allclose(unmasked.loss_terms["base"], out.loss_terms["base"], atol=1e-4)


def test_no_hard_coded_device_in_hub_code():
    """CUDA-agnostic code: tensors are created on the inputs' device, never on a named one."""
    files = sorted((REPO_ROOT / "modeling_mqirtn").glob("*.py")) + [REPO_ROOT / "processing" / "processing_mqirtn.py"]
    pattern = re.compile(r"\.cuda\(|[\"']cuda|device\s*=\s*[\"']cpu|torch\.device\([\"']")
    offenders = [
        f"{path.name}:{i}"
        for path in files
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_own_modules_follow_the_input_device():
    """Fusion, composition, losses and fingerprints run on the `meta` device: nothing is pinned to the CPU."""
    model = tiny_model("mqirtn").to("meta")
    batch_size, length, dim = 3, 5, PROJECTION_DIM
    image_states = torch.randn(batch_size, 1 + NUM_PATCHES, 32, device="meta")
    text_states = torch.randn(batch_size, length, 24, device="meta")
    mask = torch.ones(batch_size, length, dtype=torch.long, device="meta")
    fused_image, fused_text, image_attn, _ = model.fusion(image_states, text_states, mask, True)
    assert fused_image.device.type == "meta" and fused_image.shape == (batch_size, dim)
    assert image_attn[0].shape == (batch_size, FUSION_HEADS, 1 + NUM_PATCHES, length)
    query, angles = model.composition(fused_image, fused_text, -1.0)
    assert query.device.type == "meta" and query.shape == (batch_size, dim) and angles.shape == (batch_size, dim)
    ids = image_fingerprints(torch.randn(batch_size, 3, 8, 8, device="meta"))
    assert ids.device.type == "meta" and ids.dtype == torch.int64
    for loss_type in ("batch_based_classification", "soft_triplet"):
        loss = build_metric_loss(loss_type)(
            F.normalize(query, dim=-1), F.normalize(fused_image, dim=-1), torch.tensor(4.0, device="meta"), ids
        )
        assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("composition", ["mqirtn", "soft_triplet"])
def test_cuda_matches_cpu(composition):
    overrides = {"loss_type": "soft_triplet"} if composition == "soft_triplet" else {}
    model = tiny_model("mqirtn", **overrides).eval()
    batch = random_batch(6)
    batch["target_pixel_values"][4] = batch["target_pixel_values"][2]  # fingerprints on the GPU
    with torch.no_grad():
        cpu = model(**batch, return_loss=True)
    model = model.cuda()
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        gpu = model(**cuda_batch, return_loss=True)
    for name in ("query_embeds", "target_embeds", "loss"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), atol=1e-4, rtol=1e-4)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**cuda_batch, return_loss=True, output_attentions=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )


def test_paper_size_config_builds_on_meta(record_property):
    """ViT-B/16 224 + BERT-base, projection_dim 512: built without weights: its parameter count."""
    config = MQIRTNConfig(vision_config=ViTConfig().to_dict(), text_config=BertConfig().to_dict(), projection_dim=512)
    with torch.device("meta"):
        model = MQIRTNModel(config)
    assert all(param.device.type == "meta" for param in model.parameters())
    total = sum(param.numel() for param in model.parameters())
    towers = {
        prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix + "."))
        for prefix in ("vision_model", "text_model")
    }
    new = total - sum(towers.values())
    record_property("paper_size_parameters", total)
    print(
        f"paper-size MQIRTN parameters: total {total:,}, vision {towers['vision_model']:,}, text {towers['text_model']:,}, new {new:,}"
    )
    # ViT-B/16 without pooler: 85.8M; BERT-base without pooler: 108.9M.
    assert 85_000_000 < towers["vision_model"] < 87_000_000
    assert 108_000_000 < towers["text_model"] < 110_000_000
    assert model.config.fusion_num_heads == 8 and model.fusion.layers[0].image_attention.head_dim == 64


# ---------------------------------------------------------------------------------------------- the paper's method
def _module_layout(module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def _is_torch_default(linear) -> bool:
    return bool(getattr(linear, "_mqirtn_torch_default_init", False))


def test_mqirtn_paper_is_the_fusion_plus_composeae_modules_without_residual():
    paper, composeae, ours = tiny_model("mqirtn_paper"), tiny_model("composeae"), tiny_model("mqirtn")
    assert paper.fusion is not None and paper.image_residual is None and ours.image_residual is not None
    assert type(paper.composition) is type(composeae.composition)
    assert _module_layout(paper.composition) == _module_layout(composeae.composition)
    assert _module_layout(paper.image_decoder) == _module_layout(composeae.image_decoder)
    # Two complex projections, BatchNorm + Dropout 0.5 in the image map, one 64-channel-default convolution.
    assert paper.composition.conv_projection is not None
    image_map = paper.composition.linear_projection.image_features
    assert isinstance(image_map[0], torch.nn.BatchNorm1d) and any(
        isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in image_map
    )
    assert paper.composition.linear_projection.angle_norm is None
    assert tiny_config("mqirtn_paper", conv_channels=None).conv_channels is None
    assert (
        MQIRTNModel(tiny_config("mqirtn_paper", conv_channels=None)).composition.conv_mapping.conv.out_channels == 64
    )
    # PyTorch's default init everywhere in the composition (nonzero biases), as ComposeAE.
    linears = [m for m in paper.composition.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    assert linears and all(_is_torch_default(m) for m in linears)
    assert all(m.bias.abs().sum() > 0 for m in linears)


@pytest.mark.parametrize("deviation", sorted(COMPOSITION_DEVIATIONS))
def test_each_deviation_changes_only_its_module(deviation):
    paper = tiny_model("mqirtn_paper").composition
    deviated = tiny_model("mqirtn_paper", composition_deviations=[deviation]).composition
    if deviation == "shared_projection":
        assert deviated.conv_projection is None and paper.conv_projection is not None
    elif deviation == "plain_mlps":
        image_map = deviated.linear_projection.image_features
        outside_rho_conv = [deviated.linear_projection, deviated.conv_projection, deviated.linear_mapping]
        norm_or_dropout = (torch.nn.BatchNorm1d, torch.nn.Dropout)
        assert not any(
            isinstance(m, norm_or_dropout) and getattr(m, "p", 1) > 0
            for part in outside_rho_conv
            for m in part.modules()
        )
        assert hasattr(image_map, "fc1") and _is_torch_default(image_map.fc1)
    elif deviation == "small_conv":
        assert [m.out_channels for m in deviated.conv_mapping.modules() if isinstance(m, torch.nn.Conv1d)] == [
            4,
            4,
        ]  # tiny's
        assert [m.out_channels for m in paper.conv_mapping.modules() if isinstance(m, torch.nn.Conv1d)] == [4]
        assert isinstance(deviated.conv_mapping.pool, torch.nn.AdaptiveAvgPool1d)
        assert isinstance(paper.conv_mapping.pool, torch.nn.AdaptiveMaxPool1d)
        unset = MQIRTNModel(tiny_config("mqirtn_paper", conv_channels=None, composition_deviations=[deviation]))
        assert unset.composition.conv_mapping.conv1.out_channels == 16  # MQIRTN's default with MQIRTN's form
    elif deviation == "normal_init":
        biases = [m.bias for m in deviated.linear_mapping.modules() if isinstance(m, torch.nn.Linear)]
        assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)  # transformers' init zeroes biases
        text_linears = [
            m for m in deviated.linear_projection.text_features.modules() if isinstance(m, torch.nn.Linear)
        ]
        assert all(_is_torch_default(m) for m in text_linears)  # the angle map keeps PyTorch's init
    else:  # angle_layernorm: angles of rms 1 per text
        assert deviated.linear_projection.angle_norm is not None
        angles = tiny_model("mqirtn_paper", composition_deviations=[deviation])(
            **random_batch(4), output_composition=True
        ).composition_angles
        torch.testing.assert_close(angles.pow(2).mean(dim=-1).sqrt(), torch.ones(4), atol=0.05, rtol=0)
    assert deviated.deviations == (deviation,)


def test_all_deviations_plus_residual_build_the_default_composition():
    ours = tiny_model("mqirtn")
    rebuilt = tiny_model(
        "mqirtn_paper", composition_deviations=list(COMPOSITION_DEVIATIONS), image_residual=True, conv_channels=4
    )
    shapes = lambda model: sorted(tuple(p.shape) for p in model.parameters())  # noqa: E731
    assert shapes(rebuilt) == shapes(ours)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in ours.parameters())
    assert sorted(COMPOSITION_DEVIATIONS) == sorted(MQIRTN_DEVIATIONS)


def test_composition_deviations_validation():
    with pytest.raises(Exception, match="composition_deviations.*mqirtn_paper"):
        tiny_config("mqirtn", composition_deviations=["small_conv"])
    with pytest.raises(Exception, match="must name some of"):
        tiny_config("mqirtn_paper", composition_deviations=["bigger_conv"])
