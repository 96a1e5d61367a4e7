"""train.py end to end on tiny towers: smoke run + fresh-process reload + --eval_only, kill-and-resume,
non-finite losses, --push_to_hub against a stand-in HfApi, argument validation, and the training data plumbing."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modeling_mqirtn import COMPOSITIONS, LOSS_TYPES
from mqirtn_train.arguments import build_parser, default_text_model, parse_args
from mqirtn_train.checkpoints import CHECKPOINT_COMPLETE_FILE
from mqirtn_train.data import DATASETS, DEFAULT_SPLITS, loader_options
from mqirtn_train.evaluation import evaluate_split
from mqirtn_train.frozen_text import CachedFrozenTextModel
from mqirtn_train.model import build_model_and_processor, parameter_groups
from mqirtn_train.run import TrainingRun
from processing.data.shapes import MODIFICATION_TYPES

from utils import TINY_TRAIN_ARGS as TINY_ARGS
from utils import TRAIN_DATA_ARGS as DATA_ARGS
from utils import TRAIN_SCRIPT, make_cirr, read_json, run_train, run_train_script, train_command
from utils import train_env as run_env


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mqirtn-cache")


# ------------------------------------------------------------------------------------------------ smoke + reload
@pytest.mark.slow
def test_train_save_reload_in_fresh_process_and_eval_only(tmp_path, cache_dir):
    output = tmp_path / "model"
    result = run_train(["--output_dir", str(output), "--max_train_steps", "4", "--num_results_grids", "1"], cache_dir)
    # A quiet log: no backend fallback warning, no load-report table for the dropped pooler, no per-file bars.
    for noise in ("torchvision", "LOAD REPORT", "Saving the dataset", "Loading weights", "Writing model shards"):
        assert noise not in result.stderr, noise

    # The Recall@K table is printed and written.
    assert "recall@1" in result.stdout and "recall@50" in result.stdout
    results = read_json(output / "eval_results.json")
    assert set(results["test"]) == {"recall@1", "recall@5", "recall@10", "recall@50"}
    assert all(round(value, 4) == value for value in results["test"].values())  # no float32 noise in the percents
    # What the headline hides: Recall per modification type and the queries that return their own reference.
    retrieval = results["retrieval_diagnostics"]["test"]
    assert set(retrieval["by_modification_type"]) == set(MODIFICATION_TYPES)
    assert sum(entry["queries"] for entry in retrieval["by_modification_type"].values()) == int(
        DATA_ARGS[DATA_ARGS.index("--shapes_num_test_queries") + 1]
    )
    assert 0.0 <= retrieval["reference_ranked_first"] <= 100.0
    assert "By modification type" in result.stdout and "own reference image is ranked first" in result.stdout
    state = read_json(output / "training_state.json")
    assert state["completed_steps"] == 4 and state["samples_seen"] == 4 * 8
    # The library versions that decide the weights bit for bit travel with the run's numbers.
    assert state["libraries"]["torch"] == torch.__version__
    assert state["libraries"]["transformers"] == transformers.__version__
    assert results["training"]["libraries"] == state["libraries"]
    for name in (
        "model.safetensors",
        "config.json",
        "processor_config.json",
        "modeling_mqirtn.py",
        "processing_mqirtn.py",
        "README.md",
    ):
        assert (output / name).is_file(), name
    assert not list(output.glob("*.bin")) and not list(output.glob("*.pt"))
    assert (output / "results_grids" / "query_0.png").is_file()  # qualitative figures after evaluation
    assert (output / "results_grids" / "attention_0.png").is_file()

    # README.md: YAML metadata with the results as model-index entries.
    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers"
    assert "composed-image-retrieval" in card.data.tags
    recall_at_1 = [r for r in card.data.eval_results if r.metric_name == "recall@1"]
    assert recall_at_1 and recall_at_1[0].metric_value == pytest.approx(results["test"]["recall@1"], abs=0.01)
    assert "| recall@1 |" in card.text

    # What the composition does, at the start and after training, is recorded with the results.
    composition = results["composition"]
    assert composition["start"]["angle_rms"] > 0.3 and 0 < composition["end"]["composition_norm_share"] < 1
    assert composition["start"]["angle_spread_across_texts"] > 0  # different texts, different rotations
    for moment in ("start", "end"):
        shares = [v for k, v in composition[moment].items() if k.startswith("grad_share_")]
        assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-4)
        assert composition[moment]["back_query_cosine_conjugate_vs_same"] < 1.0
    assert results["training"]["completed_steps"] == 4 and results["training"]["time_limit_reached"] is False
    assert "angle_rms=" in result.stderr  # logged during training too

    # The logit scale trains on its own learning rate: after 4 steps it has moved away from its init (20).
    scale = load_file(output / "model.safetensors")["logit_scale"].item()
    assert abs(scale - 20.0) > 0.01

    # A fresh process, another cwd, no PYTHONPATH: only the saved folder and trust_remote_code.
    script = textwrap.dedent(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(output)!r}, trust_remote_code=True)
        batch = processor(images=[Image.new("RGB", (32, 32), (200, 30, 30))] * 2, text=["add a small red circle to the top left", "remove the blue square"], return_tensors="pt")
        with torch.no_grad():
            query = model.get_query_features(**batch).pooler_output
            gallery = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        from transformers import pipeline
        pipe = pipeline("composed-image-retrieval", model={str(output)!r}, trust_remote_code=True)
        hits = pipe(image=Image.new("RGB", (32, 32), (200, 30, 30)), text="add a small red circle to the top left", gallery=gallery, top_k=2)
        print(json.dumps({{"module": type(model).__module__, "query": list(query.shape), "norm": query.norm(dim=-1).tolist(),
                          "gallery": list(gallery.shape), "scale": model.logit_scale.item(), "hits": len(hits),
                          "pipe_score": hits[0]["score"], "direct_score": (query[0] @ gallery[0]).item()}}))
        """
    )
    env = {k: v for k, v in run_env(cache_dir).items() if k != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info["module"].startswith("transformers_modules")  # the saved code, not this repository
    assert info["query"] == [2, 32] and info["gallery"] == [2, 32]
    assert info["norm"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert info["scale"] == pytest.approx(scale)
    # The pipeline loads from the same folder and scores like the model (both gallery rows are the same image).
    assert info["hits"] == 2 and info["pipe_score"] == pytest.approx(info["direct_score"], abs=1e-4)

    # --eval_only on the saved model reproduces the numbers of the training run's evaluation.
    eval_output = tmp_path / "eval"
    run_train(
        ["--eval_only", "--model_name_or_path", str(output), "--output_dir", str(eval_output)],
        cache_dir,
        base=DATA_ARGS,
    )
    evaluated = read_json(eval_output / "eval_results.json")["test"]
    assert evaluated.keys() == results["test"].keys()
    for key, value in results["test"].items():
        assert evaluated[key] == pytest.approx(value, abs=1e-6), key
    assert not (eval_output / "model.safetensors").exists()  # evaluation does not write a model


# ------------------------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_sigkill_and_resume_ends_like_an_uninterrupted_run(tmp_path, cache_dir):
    # 64 queries / batch 8 = 8 steps per epoch; 12 steps cross an epoch boundary; checkpoints at 3, 6, 9 fall mid-epoch.
    # Dropout on (the from-scratch text tower's 0.1): a resumed run must continue the same dropout masks.
    common = [
        "--max_train_steps",
        "12",
        "--checkpointing_steps",
        "3",
        "--checkpoints_total_limit",
        "2",
        "--no-do_eval",
    ]
    reference = tmp_path / "reference"
    run_train([*common, "--output_dir", str(reference)], cache_dir)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        train_command([*common, "--output_dir", str(killed)], faults=["--sleep_per_step", "0.4"]),
        env=run_env(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not list((killed / "checkpoints").glob("checkpoint-*/progress.json")):
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "training_state.json").exists()  # it really died mid-run
    checkpoints = sorted(
        int(p.parent.name.split("-")[1]) for p in (killed / "checkpoints").glob("checkpoint-*/progress.json")
    )
    assert checkpoints and checkpoints[-1] < 12

    resumed = run_train([*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"], cache_dir)
    assert f"Resumed from {killed / 'checkpoints'}" in resumed.stderr
    expected = read_json(reference / "training_state.json")
    state = read_json(killed / "training_state.json")
    assert (
        (state["completed_steps"], state["samples_seen"])
        == (expected["completed_steps"], expected["samples_seen"])
        == (12, 96)
    )
    # Model, optimizer, scheduler, RNG and data order were all restored: the weights match too.
    final, expected_weights = load_file(killed / "model.safetensors"), load_file(reference / "model.safetensors")
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # checkpoints_total_limit=2 keeps the last two.
    assert len(list((killed / "checkpoints").glob("checkpoint-*"))) == 2


@pytest.mark.slow
def test_resume_with_the_frozen_text_cache_is_bit_exact(tmp_path, cache_dir):
    # A frozen pretrained text tower (the cache is on): the resumed run recomputes the cache's texts in the sub-batches
    # the interrupted run used, so its weights equal the uninterrupted run's bit for bit.
    pretrained_text = [*DATA_ARGS, *TINY_ARGS[TINY_ARGS.index("--patch_size") :]]
    start = pretrained_text.index("--text_from_scratch")
    del pretrained_text[start : start + 7]  # the from-scratch text tower and its 3 sizes: the default MiniLM instead
    assert not any(arg.startswith("--text_") for arg in pretrained_text)
    common = ["--freeze_text", "--max_train_steps", "6", "--checkpointing_steps", "3", "--no-do_eval"]
    reference = tmp_path / "reference"
    run_train([*common, "--output_dir", str(reference)], cache_dir, base=pretrained_text)
    checkpoint = reference / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "frozen_text_cache_0.safetensors").is_file()

    def resumed_weights(name: str, drop_history: bool = False) -> tuple[dict, str]:
        copy = tmp_path / name / "checkpoints" / "checkpoint-3"
        shutil.copytree(checkpoint, copy)
        if drop_history:  # a checkpoint without the history: the marker must not list the file either
            (copy / "frozen_text_cache_0.safetensors").unlink()
            marker = json.loads((copy / CHECKPOINT_COMPLETE_FILE).read_text())
            del marker["files"]["frozen_text_cache_0.safetensors"]
            (copy / CHECKPOINT_COMPLETE_FILE).write_text(json.dumps(marker))
        args = [*common, "--output_dir", str(tmp_path / name), "--resume_from_checkpoint", str(copy)]
        result = run_train(args, cache_dir, base=pretrained_text)
        return load_file(tmp_path / name / "model.safetensors"), result.stderr

    expected = load_file(reference / "model.safetensors")
    exact, log = resumed_weights("resumed")
    assert "Frozen-text cache: recomputed the" in log
    assert exact.keys() == expected.keys() and all(torch.equal(exact[k], expected[k]) for k in expected)
    approximate, log = resumed_weights("without_history", drop_history=True)
    assert "has no frozen_text_cache_0.safetensors" in log and "not bit for bit" in log
    for name, tensor in expected.items():
        torch.testing.assert_close(approximate[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_damaged_frozen_text_cache_history_is_refused_with_its_name(tmp_path):
    from safetensors.torch import save_file

    from utils import tiny_model

    tower = tiny_model("mqirtn").text_model.requires_grad_(False)
    cache = CachedFrozenTextModel(tower)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    cache(input_ids=ids, attention_mask=(ids > 0).long())
    cache(input_ids=torch.tensor([[5, 6, 7, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    history = tmp_path / "history.safetensors"
    cache.save_history(history)
    replayed = CachedFrozenTextModel(tower)
    assert replayed.load_history(history) == 3
    assert replayed.groups == cache.groups == [[(5, 6, 7), (8, 9)], [(5, 6, 7, 3)]]
    assert all(torch.equal(replayed.entries[key], cache.entries[key]) for key in cache.entries)
    vocab = tower.get_input_embeddings().num_embeddings
    for arrays in (
        {"token_ids": torch.tensor([1, 2, 3]), "lengths": torch.tensor([2]), "group_sizes": torch.tensor([1])},
        {"token_ids": torch.tensor([1, vocab]), "lengths": torch.tensor([2]), "group_sizes": torch.tensor([1])},
        {"token_ids": torch.tensor([1, 2]), "lengths": torch.tensor([2])},
    ):
        save_file(arrays, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match="bad.safetensors is not a frozen-text-cache history"):
            CachedFrozenTextModel(tower).load_history(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        CachedFrozenTextModel(tower).load_history(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------------------ non-finite losses
@pytest.mark.slow
def test_nonfinite_loss_skips_the_step_and_repeated_ones_stop_the_run(tmp_path, cache_dir):
    output = tmp_path / "once"
    result = run_train(
        ["--output_dir", str(output), "--max_train_steps", "4", "--no-do_eval"],
        cache_dir,
        faults=["--nonfinite_micro_steps", "1"],
    )
    assert "Non-finite loss at step 1" in result.stderr
    state = read_json(output / "training_state.json")
    assert state["completed_steps"] == 4 and state["skipped_nonfinite_steps"] == 1

    failed = run_train(
        ["--output_dir", str(tmp_path / "always"), "--max_train_steps", "6", "--no-do_eval", "--max_nonfinite_steps", "3"],
        cache_dir,
        check=False,
        faults=["--nonfinite_micro_steps", "1,2,3"],
    )  # fmt: skip
    assert failed.returncode != 0
    assert "non-finite for 3 micro-batches in a row" in failed.stderr
    assert not (tmp_path / "always" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ push to hub
class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records what would be checked, created and uploaded, and whether the
    run had trained anything yet (a model or checkpoint in `watch`) at each call."""

    calls: list = []
    watch: Path | None = None
    fail_upload: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def _trained_yet(self) -> bool:
        return RecordingHfApi.watch is not None and any(RecordingHfApi.watch.rglob("*.safetensors"))

    def whoami(self):
        RecordingHfApi.calls.append(("whoami", self.token, self._trained_yet()))
        return {"name": "someone"}

    def create_repo(self, repo_id, exist_ok=False, private=False, **kwargs):
        RecordingHfApi.calls.append(
            ("create_repo", repo_id, {"exist_ok": exist_ok, "private": private}, self._trained_yet())
        )

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        import fnmatch

        if RecordingHfApi.fail_upload is not None:
            raise RecordingHfApi.fail_upload
        files = sorted(
            str(p.relative_to(folder_path))
            for p in Path(folder_path).rglob("*")
            if p.is_file()
            and not any(fnmatch.fnmatch(str(p.relative_to(folder_path)), pat) for pat in ignore_patterns or [])
        )
        RecordingHfApi.calls.append(("upload_folder", repo_id, files))


def run_with_recording_hub(monkeypatch, cache_dir, output, *extra, fail_upload=None):
    from mqirtn_app import model_card

    monkeypatch.setattr(model_card, "HfApi", RecordingHfApi)
    monkeypatch.setenv("MQIRTN_CACHE", str(cache_dir))
    RecordingHfApi.calls, RecordingHfApi.watch, RecordingHfApi.fail_upload = [], output, fail_upload
    torch.set_num_threads(1)
    try:
        return run_train_script(
            [*TINY_ARGS, "--output_dir", str(output), "--max_train_steps", "2", "--checkpointing_steps", "1", "--push_to_hub",
             "--hub_model_id", "someone/mqirtn-tiny", "--hub_private", *extra], monkeypatch
        )  # fmt: skip
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_push_to_hub_checks_first_and_uploads_the_saved_folder_with_tensorboard_logs(tmp_path, cache_dir, monkeypatch):
    output = tmp_path / "pushed"
    status = run_with_recording_hub(
        monkeypatch, cache_dir, output, "--report_to", "tensorboard", "--hub_token", "hf_secret"
    )
    assert status == 0
    # Token checked and repository created before anything was trained; the upload comes last.
    assert RecordingHfApi.calls[0] == ("whoami", "hf_secret", False)
    assert RecordingHfApi.calls[1] == (
        "create_repo",
        "someone/mqirtn-tiny",
        {"exist_ok": True, "private": True},
        False,
    )
    kind, repo_id, files = RecordingHfApi.calls[2]
    assert (kind, repo_id) == ("upload_folder", "someone/mqirtn-tiny") and len(RecordingHfApi.calls) == 3
    for name in ("model.safetensors", "config.json", "README.md", "eval_results.json", "modeling_mqirtn.py",
                 "processing_mqirtn.py", "pipeline_mqirtn.py"):  # fmt: skip
        assert name in files
    assert not [f for f in files if f.startswith("checkpoints/")]  # training state stays local
    logs = [f for f in files if f.startswith("runs/") and "tfevents" in f]
    assert logs, files  # the TensorBoard logs go up with the model
    assert (output / logs[0]).stat().st_size > 100  # flushed before the upload: more than the file header
    assert "someone/mqirtn-tiny" in (output / "README.md").read_text()


@pytest.mark.slow
def test_push_to_hub_upload_failure_is_one_line_and_the_model_stays(tmp_path, cache_dir, monkeypatch):
    output = tmp_path / "kept"
    message = str(
        run_with_recording_hub(
            monkeypatch, cache_dir, output, fail_upload=ConnectionError("Name or service not known\nmore")
        )
    )
    assert "\n" not in message and "uploading" in message and "ConnectionError: Name or service not known" in message
    assert f"The model is safe in {output}" in message and "hf upload someone/mqirtn-tiny" in message
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()


@pytest.mark.slow
def test_push_to_hub_offline_fails_before_training_in_one_line(tmp_path, cache_dir):
    output = tmp_path / "never"
    env = {**run_env(cache_dir), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}
    started = time.perf_counter()
    completed = subprocess.run(
        train_command(["--output_dir", str(output), "--max_train_steps", "2", "--push_to_hub", "--hub_model_id", "someone/x"]),
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: --push_to_hub: checking the Hub token failed (OfflineModeIsEnabled:"), last
    assert "Nothing was trained" in last and "HF_HUB_OFFLINE" in last
    assert "Traceback" not in completed.stderr
    assert not any(output.rglob("*.safetensors")) and not (output / "checkpoints").exists()
    assert elapsed < 120, f"the Hub check came after {elapsed:.0f} s"


# ------------------------------------------------------------------------------------------------ argument errors
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (
            ["--push_to_hub", "--hub_model_id", "a/b", "--eval_only", "--model_name_or_path", "m"],
            "--eval_only trains nothing",
        ),
        (["--eval_only"], "--eval_only needs --model_name_or_path"),
        (["--dataset", "cirr"], "needs --data_dir"),
        (["--do_predict"], "--do_predict writes CIRR"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps must be"),
        (["--image_size", "30", "--patch_size", "8"], "must be a multiple of --patch_size"),
        (["--freeze_vision"], "--freeze_vision would freeze a randomly initialised"),
        (["--text_from_scratch", "--freeze_text"], "--freeze_text would freeze"),
        (["--dataset", "shapes", "--dataset_name", "x/y"], "either --dataset or --dataset_name"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "no checkpoint folder"),
        (["--no-do_eval", "--eval_steps", "10"], "--eval_steps evaluates during training"),
        (["--learning_rate", "-1"], "must be a positive number"),
        (["--composition", "bogus"], "invalid choice"),
        (["--model_name_or_path", "m", "--text_from_scratch"], "loads a whole MQIRTN model"),
        (["--config_overrides", "no_such_field=1"], "'no_such_field' is not an MQIRTNConfig field"),
        (["--config_overrides", "symmetric_loss_weight"], "items must look like key=value"),
        (["--config_overrides", "vision_config=1"], "'vision_config' is not an MQIRTNConfig field"),
        (["--config_overrides", "composition_weights_init=[1,0.1"], "unbalanced '['"),
        (["--config_overrides", "composition_weights_init=1,0.1]"], "unbalanced ']'"),
        # A flag that does not apply is refused, never parsed and ignored.
        (
            ["--model_name_or_path", "m", "--projection_dim", "64"],
            "--projection_dim define a new model's architecture",
        ),
        (["--model_name_or_path", "m", "--composition", "tirg"], "--composition define a new model's architecture"),
        (
            ["--model_name_or_path", "m", "--config_overrides", "fusion_dropout=0.1"],
            "--config_overrides fusion_dropout define",
        ),
        (["--model_name_or_path", "m", "--text_model_name_or_path", "x"], "--text_model_name_or_path define"),
        (["--both_caption_orders"], "--both_caption_orders swaps FashionIQ's two captions"),
        (["--text_column", "caption"], "--text_column only apply to --dataset_name"),
        (["--modification_type_column", "kind"], "--modification_type_column only apply to --dataset_name"),
        (
            ["--composition", "tirg", "--no_image_residual"],
            "--no_image_residual applies to the compositions with an image residual",
        ),
        (
            ["--dataset", "cirr", "--data_dir", "x", "--shapes_num_test_queries", "9"],
            "--shapes_num_test_queries only apply to --dataset shapes",
        ),
    ],
)
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        parse_args(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_embedded_shapes_run():
    args = parse_args([])
    assert (args.source, args.eval_split, args.do_eval) == ("shapes", "test", True)
    assert args.output_dir == "outputs/mqirtn-shapes"
    assert args.text_model_name_or_path == default_text_model()
    # A step budget decides what is trained (3 epochs); the clock is only a safety net far above the expected time.
    assert args.freeze_text and args.logit_scale_init_value is None and args.max_train_minutes == 45.0
    assert args.learning_rate == 5e-4 and args.max_train_steps is None and args.num_train_epochs == 3
    assert not parse_args(["--text_from_scratch"]).freeze_text
    assert parse_args(["--dataset", "cirr", "--data_dir", "x"]).max_train_minutes == 0.0
    assert parse_args(["--checkpointing_steps", "7"]).checkpointing_steps == 7


def test_parameter_groups_give_the_logit_scale_and_pretrained_towers_their_own_rates():
    args = parse_args(["--image_size", "32", "--patch_size", "8", "--vision_hidden_size", "32", "--vision_num_attention_heads", "2",
                             "--vision_num_hidden_layers", "1", "--projection_dim", "32", "--learning_rate", "1e-3",
                             "--tower_lr_multiplier", "0.1", "--logit_scale_lr", "0.05"])  # fmt: skip
    model, processor, pretrained = build_model_and_processor(args)
    assert pretrained == ("text_model.",)  # the MiniLM text tower is pretrained, the ViT is not
    groups = {group["name"]: group for group in parameter_groups(model, args, pretrained)}
    assert [p is model.logit_scale for p in groups["logit_scale"]["params"]] == [True]
    assert groups["logit_scale"]["lr"] == 0.05 and groups["logit_scale"]["weight_decay"] == 0.0
    assert groups["towers"]["lr"] == pytest.approx(1e-4) and groups["new"]["lr"] == 1e-3
    tower_ids = {id(p) for g in ("towers", "towers_no_decay") for p in groups[g]["params"]}
    assert tower_ids == {id(p) for p in model.text_model.parameters()}
    assert {id(p) for p in model.vision_model.parameters()} <= {
        id(p) for g in ("new", "new_no_decay") for p in groups[g]["params"]
    }
    # The pretrained weights survived composition (post_init must not re-initialise them).
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(args.text_model_name_or_path, add_pooling_layer=False)
    torch.testing.assert_close(
        model.text_model.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight
    )


def test_config_overrides_reach_the_model_config():
    args = parse_args(["--text_from_scratch", "--text_hidden_size", "32", "--text_num_hidden_layers", "1",
                             "--text_num_attention_heads", "2", "--image_size", "32", "--patch_size", "8",
                             "--vision_hidden_size", "32", "--vision_num_attention_heads", "2", "--vision_num_hidden_layers", "1",
                             "--projection_dim", "32",
                             "--config_overrides", "symmetric_loss_weight=0,fusion_dropout=0.25,image_residual=false,conv_channels=4,"
                             "composition_weights_init=[1, 0.1],logit_scale_bounds=[2,50]"])  # fmt: skip
    assert args.config_overrides == {"symmetric_loss_weight": 0, "fusion_dropout": 0.25, "image_residual": False, "conv_channels": 4,
                                     "composition_weights_init": [1, 0.1], "logit_scale_bounds": [2, 50]}  # fmt: skip
    model, _, _ = build_model_and_processor(args)
    config = model.config
    assert (config.symmetric_loss_weight, config.fusion_dropout, config.image_residual, config.conv_channels) == (
        0,
        0.25,
        False,
        4,
    )
    assert list(config.composition_weights_init) == [1, 0.1] and list(config.logit_scale_bounds) == [2, 50]
    assert model.image_residual is None and model.composition.conv_mapping.conv1.out_channels == 4


# ------------------------------------------------------------------------------------------------ data plumbing
def test_training_collator_replaces_unreadable_images_and_keeps_ids(tmp_path):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from transformers import ViTImageProcessor

    from processing import MQIRTNProcessor
    from processing.data.transforms import CIRTrainingCollator, set_training_transform, stable_id

    def png(color) -> bytes:
        buffer = io.BytesIO()
        PILImage.new("RGB", (20, 20), color).save(buffer, format="PNG")
        return buffer.getvalue()

    features = Features(
        {
            "reference_image": Image(),
            "modification_text": Value("string"),
            "target_image": Image(),
            "target_id": Value("string"),
        }
    )
    dataset = Dataset.from_dict(
        {
            "reference_image": [{"bytes": png((255, 0, 0)), "path": None}, {"bytes": b"not a png", "path": None},
                                {"bytes": None, "path": str(tmp_path / "missing.png")}, {"bytes": png((0, 0, 255)), "path": None}],
            "modification_text": ["make it blue", "broken", "missing", "make it red"],
            "target_image": [{"bytes": png((0, 0, 255)), "path": None}] * 4,
            "target_id": ["blue", "x", "y", "red"],
        },
        features=features,
    )  # fmt: skip
    processor = MQIRTNProcessor(
        ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        AutoTokenizer.from_pretrained(default_text_model()),
    )
    transformed = set_training_transform(dataset, processor)
    assert (
        dataset.features["reference_image"].decode and dataset.format["type"] is None
    )  # the caller's dataset is untouched
    rows = [transformed[i] for i in range(4)]
    assert rows[1]["pixel_values"] is None and rows[2]["pixel_values"] is None
    batch = CIRTrainingCollator(processor.tokenizer)(rows)
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["target_pixel_values"].shape == (4, 3, 16, 16)
    assert batch["input_ids"].shape[0] == 4
    # The two bad rows became copies of readable rows, with their target ids (so they are masked as duplicates).
    assert batch["target_ids"].tolist() == [stable_id("blue"), stable_id("red"), stable_id("blue"), stable_id("red")]
    assert torch.equal(batch["pixel_values"][2], batch["pixel_values"][0])


@pytest.mark.slow
def test_max_train_minutes_stops_every_process_at_the_same_step(tmp_path, cache_dir):
    output = tmp_path / "timed"
    result = run_train(
        ["--output_dir", str(output), "--max_train_steps", "40", "--max_train_minutes", "1e-6"], cache_dir
    )
    assert "--max_train_minutes 1e-06 reached: stopping at step 10 of 40" in result.stderr
    state = read_json(output / "training_state.json")
    assert state["completed_steps"] == 10 and state["time_limit_reached"] is True
    assert (output / "model.safetensors").is_file()  # the model is still saved
    # The guard that fired says so wherever the results go: the printed table, eval_results.json and the model card.
    assert "CUT SHORT by --max_train_minutes 1e-06: trained 10 of 40 steps" in result.stdout
    record = read_json(output / "eval_results.json")
    assert record["training"]["time_limit_reached"] is True and record["training"]["completed_steps"] == 10
    assert "YES: cut short at step 10 of 40" in (output / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ CIRR: eval + predict
@pytest.mark.slow
def test_cirr_training_evaluation_and_submission_files(tmp_path, cache_dir):

    root = tmp_path / "cirr"
    make_cirr(root, root / "img_raw")
    output = tmp_path / "out"
    shapes_flags = {i for i, arg in enumerate(TINY_ARGS) if arg.startswith("--shapes_")}
    model_args = [arg for i, arg in enumerate(TINY_ARGS) if i not in shapes_flags and i - 1 not in shapes_flags]
    result = run_train(
        ["--dataset", "cirr", "--data_dir", str(root), "--do_eval", "--do_predict", "--per_device_train_batch_size", "2",
         "--max_train_steps", "1", "--output_dir", str(output)],
        cache_dir,
        base=model_args,
    )  # fmt: skip
    # Evaluated on val with the CIRR protocol (reference removed, subset recalls, leaderboard average).
    metrics = read_json(output / "eval_results.json")["val"]
    assert {"recall@1", "recall@50", "recall_subset@1", "recall_subset@3", "average"} <= set(metrics)
    assert "recall_subset@1" in result.stdout
    # The two test-server files, in the server's format, for test1's pair 7 (reference removed from its ranking).
    recall = read_json(output / "recall_submission_mqirtn.json")
    subset = read_json(output / "recall_subset_submission_mqirtn.json")
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    assert sorted(recall["7"]) == ["test1-1-0-img0", "test1-2-0-img0"]
    assert sorted(subset["7"]) == ["test1-1-0-img0", "test1-2-0-img0"]


@pytest.mark.slow
def test_bf16_mixed_precision_on_cpu(tmp_path, cache_dir):
    output = tmp_path / "bf16"
    result = run_train(
        ["--output_dir", str(output), "--max_train_steps", "3", "--no-do_eval", "--mixed_precision", "bf16"], cache_dir
    )
    assert "Mixed precision type: bf16" in result.stderr
    assert read_json(output / "training_state.json")["skipped_nonfinite_steps"] == 0
    weights = load_file(output / "model.safetensors")
    assert weights["logit_scale"].dtype == torch.float32  # master weights stay fp32


@pytest.mark.slow
def test_eval_steps_select_the_best_model_on_validation(tmp_path, cache_dir):
    output = tmp_path / "selected"
    result = run_train(["--output_dir", str(output), "--max_train_steps", "4", "--eval_steps", "2"], cache_dir)
    assert "validation @ step 2" in result.stderr  # model selection uses the validation split, not test
    assert (output / "best_model" / "model.safetensors").is_file() and (
        output / "best_model" / "config.json"
    ).is_file()


def test_frozen_text_cache_gives_the_same_queries_and_reuses_texts(tmp_path):
    from utils import random_batch, tiny_model

    model = tiny_model("mqirtn").eval()
    model.text_model.requires_grad_(False)
    batch = random_batch(6)
    # Rows 4 and 5 repeat rows 0 and 1 with more padding: the cache must key texts by their real tokens only.
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(6, 3, dtype=torch.long)], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(6, 3, dtype=torch.long)], dim=1)
    batch["input_ids"][4:], batch["attention_mask"][4:] = batch["input_ids"][:2], batch["attention_mask"][:2]
    with torch.no_grad():
        expected = model(**batch, return_loss=True)
    tower = model.text_model
    plain_state = model.state_dict()
    model.text_model = cache = CachedFrozenTextModel(tower)
    with torch.no_grad():
        first = model(**batch, return_loss=True)
        second = model(**batch, return_loss=True)
    for got in (first, second):
        torch.testing.assert_close(got.query_embeds, expected.query_embeds, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-4)
    assert cache.misses == 4 and cache.hits == 2 + 6  # 4 distinct texts computed once
    copied = __import__("copy").deepcopy(model)
    assert copied.text_model.entries is cache.entries  # a model copy shares the entries
    torch.testing.assert_close(copied(**batch).query_embeds, expected.query_embeds, atol=1e-5, rtol=1e-4)
    # The state dict is the plain tower's (same keys, same order, same tensors), and loads back either way.
    cached_state = model.state_dict()
    assert list(cached_state) == list(plain_state)
    assert all(
        cached_state[key] is plain_state[key] or torch.equal(cached_state[key], plain_state[key])
        for key in plain_state
    )
    other = tiny_model("mqirtn", seed=5)
    other.text_model.requires_grad_(False)
    other.text_model = CachedFrozenTextModel(other.text_model)
    other.load_state_dict(plain_state)
    assert torch.equal(
        other.text_model.tower.embeddings.word_embeddings.weight, tower.embeddings.word_embeddings.weight
    )
    with pytest.raises(ValueError, match="frozen tower"):
        CachedFrozenTextModel(tiny_model("mqirtn").text_model)


def test_a_loaded_model_takes_the_training_objective_flags(tmp_path):
    from utils import tiny_model

    folder = tmp_path / "saved"
    tiny_model("mqirtn").save_pretrained(folder)
    from utils import tiny_processor

    tiny_processor(tmp_path).save_pretrained(folder)
    args = parse_args(
        [
            "--model_name_or_path",
            str(folder),
            "--loss_type",
            "soft_triplet",
            "--config_overrides",
            "symmetric_loss_weight=0.5",
        ]
    )
    model, _, _ = build_model_and_processor(args)
    assert model.config.loss_type == "soft_triplet" and model.config.symmetric_loss_weight == 0.5
    assert type(model.metric_loss).__name__ == "MQIRTNSoftTripletLoss"
    assert model.config.projection_dim == 32  # the architecture is the saved one
    # Explicitly asking for the config's default loss is applied too (not mistaken for "not given").
    soft = tmp_path / "soft"
    tiny_model("mqirtn", loss_type="soft_triplet").save_pretrained(soft)
    tiny_processor(tmp_path).save_pretrained(soft)
    back, _, _ = build_model_and_processor(
        parse_args(["--model_name_or_path", str(soft), "--loss_type", "batch_based_classification"])
    )
    assert back.config.loss_type == "batch_based_classification"
    kept, _, _ = build_model_and_processor(parse_args(["--model_name_or_path", str(soft)]))
    assert kept.config.loss_type == "soft_triplet"


def test_dataset_facts_come_from_the_registry():
    from processing.data.registry import dataset_names, get_dataset_spec

    for name in dataset_names():
        spec = get_dataset_spec(name)
        assert DEFAULT_SPLITS[name] == spec.default_splits
    assert "hub" not in DATASETS and set(DATASETS) == set(dataset_names()) - {"hub"}
    args = parse_args(["--dataset", "fashioniq", "--data_dir", "x", "--both_caption_orders"])
    assert loader_options(args, "train") == {"check_images": "exists", "both_caption_orders": True}
    shapes = parse_args(["--shapes_num_test_queries", "7"])
    assert loader_options(shapes, "test")["num_queries"] == 7


def test_recall_is_computed_once_at_run_time():
    # The `evaluate` module is cross-checked against the package's Recall in test_retrieval_metrics, not in training.
    assert "evaluate" not in evaluate_split.__code__.co_names
    # The best model during training is chosen by the registry's headline metric, not a table of the training code's own.
    assert "get_dataset_spec" in TrainingRun.validate.__code__.co_names


def test_from_scratch_text_tower_caps_the_tokenizer_at_its_positions():
    """A long query must not crash a model whose from-scratch text tower has 64 positions (the tokenizer kept 512)."""
    args = parse_args(
        ["--text_from_scratch", "--text_hidden_size", "32", "--text_num_attention_heads", "2", "--vision_hidden_size", "32",
         "--vision_num_attention_heads", "2", "--vision_num_hidden_layers", "1", "--projection_dim", "32"]
    )  # fmt: skip
    model, processor, _ = build_model_and_processor(args)
    assert processor.tokenizer.model_max_length == model.config.text_config.max_position_embeddings == 64
    from PIL import Image

    long_text = " ".join(["make the small red circle a large blue square"] * 12)  # ~100 tokens
    batch = processor(
        images=[Image.new("RGB", (48, 48))], text=[long_text], return_tensors="pt"
    )  # truncates by default
    assert batch["input_ids"].shape[1] <= 64
    model.eval()(**batch)


# ------------------------------------------------------------------------------------------------ --help
HELP_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print("IMPORTED", sorted({"torch", "transformers", "datasets", "modeling_mqirtn", "processing"} & set(sys.modules)))
"""


def test_help_is_fast_complete_and_names_the_real_choices():
    """`train.py --help` answers before torch is imported, every flag has help text without internal references, and
    the names the help lists are the registry's datasets, the compositions and the losses."""
    completed = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, str(TRAIN_SCRIPT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    # Fast because nothing heavy is imported (a wall-clock bound would fail on a loaded machine, not on slow code).
    assert "IMPORTED []" in completed.stdout
    help_text = " ".join(completed.stdout.split())
    for name in [*DATASETS, *COMPOSITIONS, *LOSS_TYPES]:
        assert name in help_text, name
    for internal in ("DESIGN", "benchmarks/", "notes/", "run_mlm", "site-packages", "(default: None)"):
        assert internal not in help_text, internal
    assert not [action.option_strings for action in build_parser()._actions if not action.help]
