"""`MQIRTNModel.compile_regions` and `train.py --torch_compile`: compiled regions compute what eager does.

The structural tests use torch.compile's `aot_eager` backend (the graphs dynamo captures and AOTAutograd splits into
forward and backward, run with eager kernels: seconds). One test runs inductor, the backend users get, on the fusion
and the composition: its C++ compilation takes about two minutes of CPU on a cold cache here.

Tolerances (benchmarks/README.md, "torch.compile", has the evidence): inductor fuses and reorders reductions, so in
float32 the results differ from eager by rounding only (main job's model: composed query 1.4e-7 relative, 1 ulp;
gradients 1.1e-6 of the largest), and in float64 by the same times the ratio of the machine epsilons (3e-16, 1.7e-15).
A bug (another eps, BatchNorm statistics, a dropout left on, a lost in-place update) would not shrink in float64: it
would show as a difference of the size of its effect, far above 1e-10. Dropout is off in these comparisons: compiled
code draws other random masks than eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from utils import random_batch, read_json, run_train, tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def without_dropout(model):
    """ComposeAE's image mapping has dropout 0.5 (the tiny towers and fusion have none): compiled code draws its own
    random masks, so train-mode outputs are compared with dropout off."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def train_step(model, batch, output_composition: bool = True):
    model.zero_grad(set_to_none=True)
    out = model(**batch, return_loss=True, output_composition=output_composition)
    out.loss.backward()
    return out, grads(model)


def assert_grads_close(got: dict, expected: dict, tolerance: float) -> None:
    """Every gradient within `tolerance` x the largest gradient of the model (some are exactly zero in theory, e.g.
    the attention key biases, so a per-tensor relative error would compare rounding noise with rounding noise)."""
    assert got.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    worst = max((got[name] - expected[name]).abs().max().item() for name in expected)
    assert worst <= tolerance * scale, f"gradient difference {worst:.3g} > {tolerance:g} x {scale:.3g}"


# ------------------------------------------------------------------------------------------------- structure
@pytest.mark.slow
@pytest.mark.parametrize("composition", ["mqirtn", "composeae"])
def test_compiled_regions_match_eager_and_keep_the_state_dict(composition, tmp_path):
    """aot_eager: the captured graphs (forward, backward, BatchNorm running statistics in train mode) equal eager;
    `state_dict`, `save_pretrained` and a reload are those of the eager model."""
    eager = without_dropout(tiny_model(composition))
    compiled = copy.deepcopy(eager).compile_regions(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    assert compiled.composition._compiled_call_impl is not None
    assert compiled.fusion is None or compiled.fusion._compiled_call_impl is not None
    assert compiled.vision_model.layers[0]._compiled_call_impl is None  # towers stay eager by default

    batch = random_batch(4)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        for name in ("get_query_features", "get_image_features"):
            args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[: 3 if "query" in name else 1]
            torch.testing.assert_close(
                getattr(compiled, name)(*args).pooler_output,
                getattr(eager, name)(*args).pooler_output,
                atol=1e-6,
                rtol=0,
            )

    eager.train(), compiled.train()  # BatchNorm (composeae) uses batch statistics and updates its running ones
    for _ in range(2):
        expected, expected_grads = train_step(eager, batch)
        got, got_grads = train_step(compiled, batch)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.query_embeds, expected.query_embeds, atol=1e-6, rtol=0)
        assert_grads_close(got_grads, expected_grads, 1e-5)
    for (name, got_buffer), expected_buffer in zip(compiled.named_buffers(), eager.buffers()):
        torch.testing.assert_close(got_buffer, expected_buffer, atol=1e-6, rtol=0, msg=name)  # BatchNorm statistics

    compiled.save_pretrained(tmp_path / "saved")
    eager.save_pretrained(tmp_path / "eager")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == load_file(tmp_path / "eager" / "model.safetensors").keys()
    assert not any("_orig_mod" in key for key in saved)
    reloaded = type(eager).from_pretrained(tmp_path / "saved").eval()
    query = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.get_query_features(*query).pooler_output,
            compiled.eval().get_query_features(*query).pooler_output,
            atol=1e-6,
            rtol=0,
        )


@pytest.mark.slow
def test_compiling_the_towers_too_keeps_the_outputs():
    eager = tiny_model("mqirtn").eval()
    compiled = copy.deepcopy(eager).compile_regions(towers=True, backend="aot_eager")
    assert compiled.vision_model.layers[1]._compiled_call_impl is not None
    assert compiled.text_model.encoder.layer[1]._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = random_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).query_embeds, eager(**batch).query_embeds, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- inductor
def unnormalised_query(model, batch) -> torch.Tensor:
    """theta before `normalize`, which casts to float32 (a float64 model's embeddings and loss are float32)."""
    from modeling_mqirtn.fusion_mqirtn import masked_mean

    mask = batch["attention_mask"]
    image_tokens, text_tokens = (
        model._image_tokens(batch["pixel_values"]),
        model._text_tokens(batch["input_ids"], mask),
    )
    image_embeds = model.image_projection(image_tokens[:, 0])
    text_embeds = model.text_projection(masked_mean(text_tokens, mask))
    return model._compose(image_tokens, text_tokens, mask, image_embeds, text_embeds)[0]


@pytest.mark.slow
def test_inductor_regions_match_eager_within_rounding():
    """inductor (C++ kernels), train mode: in float64 the composed query and the gradients of a step equal eager's to
    1e-10 (the compiled graphs compute the same function); in float32 within rounding: queries 1e-6 (measured <= 6e-8,
    1 ulp), gradients 1e-5 x the largest (measured 1.1e-6 on the main job's model). Eval mode is left to the aot_eager
    test above (its graphs differ only in mode): every graph costs seconds of C++ compilation here."""
    batch32 = random_batch(4)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        eager = tiny_model("mqirtn").to(dtype).train()
        compiled = copy.deepcopy(eager)
        for region in (compiled.fusion, compiled.composition):  # what compile_regions compiles, less the small MLPs
            region.compile(dynamic=True)  # (each graph costs seconds of C++ compilation)
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch32.items()}
        expected, expected_grads = train_step(eager, batch, output_composition=False)
        got, got_grads = train_step(compiled, batch, output_composition=False)
        theta, expected_theta = unnormalised_query(compiled, batch), unnormalised_query(eager, batch)
        torch.testing.assert_close(theta, expected_theta, atol=tolerance * expected_theta.abs().max().item(), rtol=0)
        torch.testing.assert_close(got.query_embeds, expected.query_embeds, atol=1e-6, rtol=0)  # float32 in both
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)
        assert_grads_close(got_grads, expected_grads, tolerance)


# ------------------------------------------------------------------------------------------------- train.py
@pytest.mark.slow
def test_train_py_torch_compile_trains_like_eager(tmp_path, tmp_path_factory):
    """`--torch_compile aot_eager` runs training, evaluation (eval mode, a last partial batch) and saving, and its
    weights equal an eager run's; inductor is the flag's default backend (`--torch_compile` alone)."""
    from mqirtn_train.arguments import parse_args

    assert parse_args(["--torch_compile"]).torch_compile == "inductor"
    assert parse_args([]).torch_compile is None
    cache = tmp_path_factory.mktemp("mqirtn-cache")
    weights = {}
    for name, extra in (("eager", []), ("compiled", ["--torch_compile", "aot_eager"])):
        output = tmp_path / name
        result = run_train(
            ["--output_dir", str(output), "--max_train_steps", "2", "--num_train_epochs", "1", *extra], cache
        )
        assert ("torch.compile (aot_eager)" in result.stderr) == bool(extra)
        weights[name] = load_file(output / "model.safetensors")
        assert set(read_json(output / "eval_results.json")["test"]) >= {"recall@1"}
    assert weights["compiled"].keys() == weights["eager"].keys()
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, atol=1e-5, rtol=0, msg=key)
