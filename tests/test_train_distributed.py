"""train.py on two gloo ranks (CPU): the ranks stay identical, and one step on 2 x B equals one step on 2B.

Launched exactly as docs/training.md says: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2
--num_machines 1 --mixed_precision no --dynamo_backend no train.py ...`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from utils import REPO_ROOT as REPO
from utils import TINY_TRAIN_ARGS as TINY_ARGS
from utils import read_json, run_train
from utils import train_env as run_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mqirtn-cache-distributed")


# Dropout off, so that the two runs compute the same function; no clipping, so the dumped gradients are raw.
EXACT = ["--text_dropout", "0", "--max_grad_norm", "0", "--no-do_eval"]


@pytest.mark.slow
def test_two_gloo_ranks_match_a_single_process_on_the_concatenated_batch(tmp_path, cache_dir):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "the accelerate CLI is not installed next to this Python"
    env = run_env(cache_dir)
    env["ACCELERATE_USE_CPU"] = "1"
    distributed = tmp_path / "two"
    result = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(REPO / "tests" / "train_with_faults.py"), "--dump_grads", str(tmp_path / "grads_two.safetensors"),
         "--dump_params", str(distributed / "params"), "--",
         *TINY_ARGS, *EXACT, "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--output_dir", str(distributed)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    state = read_json(distributed / "training_state.json")
    assert state["num_processes"] == 2
    assert (state["completed_steps"], state["samples_seen"]) == (3, 3 * 2 * 4)

    # Both ranks end with identical parameters.
    rank0 = load_file(distributed / "params" / "params_rank0.safetensors")
    rank1 = load_file(distributed / "params" / "params_rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # One step's gradients equal a single process's on the concatenated batch (the loss gathers negatives
    # differentiably, so rank 0's queries are scored against rank 1's targets too, with gradient).
    single = tmp_path / "one"
    run_train(
        [*EXACT, "--per_device_train_batch_size", "8", "--max_train_steps", "1", "--output_dir", str(single)],
        cache_dir,
        faults=["--dump_grads", str(tmp_path / "grads_one.safetensors")],
    )  # fmt: skip
    two, one = load_file(tmp_path / "grads_two.safetensors"), load_file(tmp_path / "grads_one.safetensors")
    assert two.keys() == one.keys()
    assert one["logit_scale"].abs().item() > 0  # the comparison is not between zeros
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_torch_compile_on_two_gloo_ranks_trains_like_eager(tmp_path, cache_dir):
    """`--torch_compile` under DDP (two gloo ranks): the compiled regions sit inside the DDP-wrapped model, whose
    gradient hooks stay eager; 3 steps give the eager run's weights within rounding (Adam amplifies ulp differences:
    1.0e-5 seen) and the same Recall. `aot_eager`: the graph capture, without inductor's minutes of C++ compiling."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    env = {**run_env(cache_dir), "ACCELERATE_USE_CPU": "1"}
    weights, recalls = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--torch_compile", "aot_eager"])):
        output = tmp_path / name
        result = subprocess.run(
            [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(REPO / "train.py"),
             *TINY_ARGS, *EXACT[:4], "--per_device_train_batch_size", "4", "--max_train_steps", "3",
             "--output_dir", str(output), *extra],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        assert ("torch.compile (aot_eager)" in result.stderr) == bool(extra)
        assert read_json(output / "training_state.json")["num_processes"] == 2
        weights[name] = load_file(output / "model.safetensors")
        recalls[name] = read_json(output / "eval_results.json")["test"]
    assert weights["compiled"].keys() == weights["eager"].keys()
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, atol=5e-5, rtol=0, msg=key)
    assert recalls["compiled"]["recall@1"] == recalls["eager"]["recall@1"]
