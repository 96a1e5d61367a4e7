"""The paper's mechanisms act from step 0: angles that span radians, a conjugate that changes the symmetric
constraint, reconstruction that cannot cheat, one logit-scale convention, faithful baselines, any vision tower, fp16."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from modeling_mqirtn import MQIRTNConfig, MQIRTNModel
from modeling_mqirtn.composition_mqirtn import ComposeAEComposition, RealSpaceConcatComposition, TIRGComposition

from utils import ALL_COMPOSITIONS, random_batch, tiny_config, tiny_model


def angles_at_init(projection_dim: int, composition: str = "mqirtn", seed: int = 0, **overrides) -> torch.Tensor:
    # The package's own initialisation (0.02), not the tests' 0.1: the point is what a new user's model starts with.
    torch.manual_seed(seed)
    config = tiny_config(
        composition,
        projection_dim=projection_dim,
        fusion_intermediate_size=None,
        initializer_range=0.02,
        conv_channels=None,
        **overrides,
    )
    model = MQIRTNModel(config).train()
    return model(**random_batch(16), output_composition=True).composition_angles


@pytest.mark.parametrize("projection_dim", [32, 256, 512])
def test_angles_span_radians_at_init(projection_dim):
    angles = angles_at_init(projection_dim)
    rms = angles.pow(2).mean().sqrt().item()
    assert rms >= 0.3, f"delta rms {rms:.3f} rad at d={projection_dim}: the rotation starts as the identity"
    assert (angles.abs() > math.pi / 4).float().mean().item() > 0.1
    # The angles depend on the text: two different texts are rotated differently.
    assert (angles[0] - angles[1]).abs().mean().item() > 0.1


def _rotation_inputs_seen(model, batch) -> dict:
    """The (real, imaginary) parts and the angle channel the convolutional mapping of `model` receives."""
    seen = {}

    def keep(module, args):
        seen["channels"] = args[0].detach().clone()

    handle = model.composition.conv_mapping.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["channels"]


@pytest.mark.parametrize("composition", ["mqirtn", "mqirtn_paper", "composeae"])
def test_no_rotation_and_no_angle_path_keep_the_parameters(composition):
    """rotation=False: the rotation is the identity but the angles still feed rho_conv; with angle_channel=False as
    well the text has no angle path. Same parameters in all three."""
    rotating = tiny_model(composition).eval()
    still = tiny_model(composition, rotation=False).eval()
    no_angles = tiny_model(composition, rotation=False, angle_channel=False).eval()
    names = [n for n, _ in rotating.named_parameters()]
    assert names == [n for n, _ in still.named_parameters()] == [n for n, _ in no_angles.named_parameters()]
    still.load_state_dict(rotating.state_dict())
    no_angles.load_state_dict(rotating.state_dict())
    batch = random_batch(6)
    # The angles are computed in all three (the text's own); what uses them differs.
    reported = [m(**batch, output_composition=True).composition_angles for m in (rotating, still, no_angles)]
    torch.testing.assert_close(reported[0], reported[1])
    torch.testing.assert_close(reported[0], reported[2])
    # Channel layout: mqirtn stacks [Re z, Im z, eta, delta, image], ComposeAE [eta, delta, image, Re z, Im z].
    real, imag, eta, delta = (0, 1, 2, 3) if composition == "mqirtn" else (3, 4, 0, 1)
    seen = {
        name: _rotation_inputs_seen(m, batch) for name, m in (("rot", rotating), ("still", still), ("none", no_angles))
    }
    torch.testing.assert_close(seen["still"][:, real], seen["still"][:, eta])  # eta * cos 0 = eta
    assert torch.equal(seen["still"][:, imag], torch.zeros_like(seen["still"][:, imag]))  # eta * sin 0
    assert seen["still"][:, delta].abs().sum() > 0 and torch.equal(seen["still"][:, delta], seen["rot"][:, delta])
    assert torch.equal(seen["none"][:, delta], torch.zeros_like(seen["none"][:, delta]))
    torch.testing.assert_close(seen["none"][:, real], seen["still"][:, real])
    queries = [m(**batch).query_embeds for m in (rotating, still, no_angles)]
    assert not torch.allclose(queries[0], queries[1], atol=1e-4) and not torch.allclose(
        queries[1], queries[2], atol=1e-4
    )
    for field in ("rotation", "angle_channel"):
        with pytest.raises(Exception, match=f"{field}=False"):
            tiny_config("tirg", **{field: False})


@pytest.mark.parametrize("composition", ["mqirtn", "mqirtn_paper"])
def test_symmetric_controls_use_no_rotation_and_another_querys_angles(composition):
    """The symmetric constraint's controls: the target rotated by +delta, by nothing, by another query's conjugate."""
    model = tiny_model(composition).eval()
    batch = random_batch(6)
    out = model(**batch, return_loss=True, output_composition=True)
    diagnostics = out.symmetric_diagnostics
    values = {
        name: diagnostics[f"loss_{name}"].item() for name in ("same_rotation", "zero_rotation", "shuffled_rotation")
    }
    assert len({round(v, 6) for v in values.values()} | {round(out.loss_terms["symmetric"].item(), 6)}) == 4, values
    # The zero control equals the same model with rotation=False (identity rotation, angles still in rho_conv).
    still = tiny_model(composition, rotation=False).eval()
    still.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        still(**batch, return_loss=True).loss_terms["symmetric"], diagnostics["loss_zero_rotation"]
    )
    # The shuffled control with a batch whose texts are all equal is the conjugate itself (without fusion, where the
    # angles depend on the text alone).
    same_text = {
        **batch,
        "input_ids": batch["input_ids"][:1].expand(6, -1),
        "attention_mask": batch["attention_mask"][:1].expand(6, -1),
    }
    out = tiny_model(composition, num_fusion_layers=0).eval()(**same_text, return_loss=True, output_composition=True)
    torch.testing.assert_close(out.symmetric_diagnostics["loss_shuffled_rotation"], out.loss_terms["symmetric"])


@pytest.mark.parametrize("composition", ["mqirtn", "mqirtn_paper", "composeae"])
def test_conjugate_changes_the_symmetric_constraint_at_init(composition):
    model = tiny_model(composition).train()
    torch.manual_seed(1)
    out = model(**random_batch(8), return_loss=True, output_composition=True)
    diagnostics = out.symmetric_diagnostics
    # The back-query rotated by -delta is not the one rotated by +delta, and the symmetric loss sees the difference.
    assert diagnostics["back_query_cosine"].mean().item() < 0.95
    assert abs(out.loss_terms["symmetric"].item() - diagnostics["loss_same_rotation"].item()) > 1e-3


def test_composition_outputs_report_term_norms():
    model = tiny_model("mqirtn")
    out = model(**random_batch(5), output_composition=True)
    assert out.composition_norms.shape == (5,) and out.image_residual_norms.shape == (5,)
    assert (out.composition_norms > 0).all() and (out.image_residual_norms > 0).all()
    assert model(**random_batch(5)).composition_angles is None  # only when asked
    tirg = tiny_model("tirg")(**random_batch(5), output_composition=True)
    assert (
        tirg.composition_angles is None and tirg.image_residual_norms is None and tirg.composition_norms.shape == (5,)
    )


def test_reconstruction_loss_stops_the_gradient_into_its_target():
    from modeling_mqirtn.modeling_mqirtn import reconstruction_loss

    decoded = torch.randn(5, 16, requires_grad=True)
    target = torch.randn(5, 16, requires_grad=True)
    loss = reconstruction_loss(decoded, target)
    loss.backward()
    assert target.grad is None and decoded.grad.abs().sum() > 0
    expected = (F.normalize(decoded, dim=-1) - F.normalize(target, dim=-1)).pow(2).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    # The scale acts: ~2 for unrelated vectors (a mean over dimensions would be ~2/d).
    assert 1.0 < loss.item() < 3.0


@pytest.mark.parametrize("composition", ["mqirtn", "composeae", "realspace_concat"])
def test_reconstruction_terms_in_the_model(composition):
    model = tiny_model(composition).train()
    out = model(**random_batch(6), return_loss=True)
    assert (
        0.5 < out.loss_terms["reconstruction_text"].item() < 4.0
        and 0.5 < out.loss_terms["reconstruction_image"].item() < 4.0
    )
    # With fusion, psi feeds nothing but the text target: a fixed projection of the text tower's features.
    assert all(p.requires_grad for p in model.text_projection.parameters()) == (composition != "mqirtn")
    grads = torch.autograd.grad(out.loss_terms["reconstruction_text"], list(model.text_decoder.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_text_embedding_does_not_collapse_under_reconstruction():
    """Trained on the text-reconstruction term, with the text tower frozen as in the main job, psi keeps its geometry
    (before the gradient was stopped, psi was trained by this term alone and collapsed: pairwise cosine 0.86 -> 0.996
    in this test)."""
    model = tiny_model(
        "mqirtn",
        base_loss_weight=0.0,
        symmetric_loss_weight=0.0,
        reconstruction_image_loss_weight=0.0,
        reconstruction_text_loss_weight=1.0,
    ).train()
    model.text_model.requires_grad_(False)
    batch = random_batch(8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def mean_pairwise_cosine():
        with torch.no_grad():
            psi = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        return (psi @ psi.T)[~torch.eye(8, dtype=torch.bool)].mean().item()

    before = mean_pairwise_cosine()
    first = None
    for _ in range(40):
        out = model(**batch, return_loss=True)
        first = first if first is not None else out.loss_terms["reconstruction_text"].item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.loss_terms["reconstruction_text"].item() < first  # the decoder learns to reconstruct
    assert mean_pairwise_cosine() < before + 0.05, (before, mean_pairwise_cosine())


def test_logit_scale_is_not_clamped_in_forward_and_clamped_after_the_step():
    model = tiny_model("mqirtn", logit_scale_init_value=100.0)  # at the upper bound
    out = model(**random_batch(6), return_loss=True)
    out.loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0  # never frozen at a bound
    with torch.no_grad():
        model.logit_scale.fill_(250.0)
    assert model(**random_batch(6), return_loss=True).logit_scale.item() == pytest.approx(250.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(0.01)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(1.0)


def test_one_logit_scale_default_for_config_and_train():
    from mqirtn_train.arguments import parse_args
    from mqirtn_train.model import build_model_and_processor

    args = parse_args([])
    model, _, _ = build_model_and_processor(
        parse_args(
            [
                "--vision_num_hidden_layers",
                "1",
                "--vision_hidden_size",
                "32",
                "--vision_num_attention_heads",
                "2",
                "--projection_dim",
                "32",
            ]
        )
    )
    assert args.logit_scale_init_value is None  # the flag defers to the config
    assert model.config.logit_scale_init_value == MQIRTNConfig().logit_scale_init_value == 20.0
    assert model.logit_scale.item() == pytest.approx(20.0)


# ---------------------------------------------------------------------------------------------------- baselines
def _linear_weights_are_torch_default(module: nn.Module):
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            bound = 1 / math.sqrt(layer.weight[0].numel())
            weight = layer.weight.detach()
            # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std bound/sqrt(3), not 0.02.
            assert weight.abs().max().item() <= bound + 1e-6
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
            assert layer.bias.abs().max().item() <= bound + 1e-6 and layer.bias.abs().max().item() > 0


def test_composeae_follows_its_published_code():
    model = tiny_model("composeae", initializer_range=0.02)
    composition = model.composition
    assert isinstance(composition, ComposeAEComposition)
    # Two complex projections (one per mapping), each BatchNorm1d -> Linear (-> Dropout 0.5 for the image) -> ReLU -> Linear.
    for projection in (composition.linear_projection, composition.conv_projection):
        kinds = [type(m).__name__ for m in projection.image_features]
        assert kinds == ["BatchNorm1d", "Linear", "Dropout", "ReLU", "Linear"]
        assert projection.image_features[2].p == 0.5
        assert [type(m).__name__ for m in projection.text_features] == [
            "BatchNorm1d",
            "Linear",
            "Dropout",
            "ReLU",
            "Linear",
        ]
        assert projection.text_features[2].p == 0.0
    assert [type(m).__name__ for m in composition.linear_mapping] == [
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
    ]
    conv = composition.conv_mapping
    assert conv.conv.in_channels == 5 and isinstance(conv.pool, nn.AdaptiveMaxPool1d) and conv.pool.output_size == 16
    assert (
        tiny_model("composeae", conv_channels=None).composition.conv_mapping.conv.out_channels == 64
    )  # ComposeAE's 64
    assert composition.mapping_weights.tolist() == [10.0, 1.0]  # theta = 10 * linear + 1 * conv
    assert [type(m).__name__ for m in model.image_decoder] == ["BatchNorm1d", "ReLU", "Linear", "ReLU", "Linear"]
    _linear_weights_are_torch_default(composition)
    _linear_weights_are_torch_default(model.image_decoder)


def test_tirg_follows_its_published_code():
    model = tiny_model("tirg", initializer_range=0.02)
    composition = model.composition
    assert isinstance(composition, TIRGComposition)
    assert [type(m).__name__ for m in composition.gate] == ["BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in composition.residual] == ["BatchNorm1d", "ReLU", "Linear", "ReLU", "Linear"]
    assert composition.residual[2].out_features == 2 * 32  # TIRG's residual composer is 2d wide
    assert composition.mapping_weights.tolist() == [1.0, 10.0]  # a[0] gate, a[1] residual
    _linear_weights_are_torch_default(composition)


def test_realspace_concat_follows_its_published_code():
    composition = tiny_model("realspace_concat", conv_channels=None).composition
    assert isinstance(composition, RealSpaceConcatComposition)
    conv = composition.conv_mapping
    assert conv.conv.in_channels == 1 and conv.conv.out_channels == 64 and conv.pool.output_size == 20
    _linear_weights_are_torch_default(composition)


def test_baseline_init_survives_save_and_load(tmp_path):
    model = tiny_model("composeae")
    model.save_pretrained(tmp_path)
    loaded = MQIRTNModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "composition, field, value",
    [
        ("tirg", "conv_channels", 8),
        ("image_only", "composition_weights_init", [1.0, 1.0]),
        ("text_only", "conv_channels", 4),
    ],
)
def test_fields_that_do_not_apply_are_refused(composition, field, value):
    with pytest.raises(Exception, match=field):
        MQIRTNConfig(composition=composition, **{field: value})


# ---------------------------------------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("composition", ALL_COMPOSITIONS)
def test_finite_gradients_under_cpu_autocast(composition, dtype):
    model = tiny_model(composition).train()
    with torch.autocast("cpu", dtype=dtype):
        out = model(**random_batch(6), return_loss=True)
    assert out.query_embeds.dtype == torch.float32  # normalised in float32
    out.loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"{composition} {dtype}: non-finite gradient in {name}"


# ---------------------------------------------------------------------------------------------------- any tower
def _vision_configs():
    from transformers import ConvNextConfig, SiglipVisionConfig, SwinConfig

    return {
        "siglip_vision_model": SiglipVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        "swin": SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
        "convnext": ConvNextConfig(image_size=32, num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
    }


@pytest.mark.parametrize("model_type", ["siglip_vision_model", "swin", "convnext"])
def test_vision_towers_without_cls_use_their_pooled_output(model_type):
    vision = _vision_configs()[model_type]
    torch.manual_seed(0)
    model = MQIRTNModel(tiny_config("mqirtn", vision_config=vision.to_dict())).eval()
    assert not model.vision_has_cls_token
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixel_values).pooler_output.reshape(3, -1)
        expected = F.normalize(model.image_projection(pooled), dim=-1)
        got = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(got, expected)
    out = model(**random_batch(3), return_loss=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # The pooled output (not one patch) feeds the embedding: changing only the last patch row changes it.
    shifted = pixel_values.clone()
    shifted[:, :, -8:, -8:] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model.get_image_features(shifted).pooler_output[0], got[0], atol=1e-4)


def test_clip_vision_and_text_towers():
    from transformers import CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    text = CLIPTextConfig(
        vocab_size=100,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = MQIRTNModel(tiny_config("mqirtn", vision_config=vision.to_dict(), text_config=text.to_dict()))
    assert model.vision_has_cls_token  # CLIP's class embedding is token 0
    out = model(**random_batch(4), return_loss=True, output_composition=True)
    assert torch.isfinite(out.loss) and out.query_embeds.shape == (4, 32)
    out.loss.backward()
    assert model.fusion.layers[0].image_attention.q_proj.weight.grad.abs().sum() > 0


def test_angle_statistics_separate_the_text_from_a_shared_offset():
    """The text-dependent share of the angles' mean square: a per-dimension offset every text shares does not count."""
    from types import SimpleNamespace

    from mqirtn_train.diagnostics import composition_step_stats

    generator = torch.Generator().manual_seed(0)
    offset = torch.full((1, 512), 2.0)  # mean square 4, shared by every text
    text = torch.randn(4096, 512, generator=generator)  # variance 1 across texts
    outputs = SimpleNamespace(composition_angles=offset + text, image_residual_norms=None)
    stats = composition_step_stats(outputs)
    assert abs(stats["angle_text_share"].item() - 1 / 5) < 0.01
    assert abs(stats["angle_spread_across_texts"].item() - 1.0) < 0.02
    assert (
        composition_step_stats(SimpleNamespace(composition_angles=offset.expand(8, -1), image_residual_norms=None))[
            "angle_text_share"
        ].item()
        == 0.0
    )
