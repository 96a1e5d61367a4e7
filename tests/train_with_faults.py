#!/usr/bin/env python
"""`python train.py` with faults injected and internals recorded, for the tests (train.py has no debug flags; this
script wraps the training loop's `forward_loss` and `apply_update` in `mqirtn_train.run` instead). Not a test module;
the tests run it as a script:

    python tests/train_with_faults.py [--nonfinite_micro_steps 1,2] [--sleep_per_step 0.4] [--dump_grads FILE]
                                      [--dump_params DIR] -- <train.py arguments>

- `--nonfinite_micro_steps`: the loss of these micro-batches (0-based, counted in this process) becomes NaN;
- `--sleep_per_step`: seconds slept after every micro-batch (a run slow enough to be killed mid-way);
- `--dump_grads`: the main process's gradients before the first update, as safetensors;
- `--dump_params`: every process's final parameters, `params_rank{R}.safetensors` in DIR.
"""

import argparse
import runpy
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from mqirtn_train import run as training_run


TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nonfinite_micro_steps", default="", help="comma-separated micro-batch indices")
    parser.add_argument("--sleep_per_step", type=float, default=0.0)
    parser.add_argument("--dump_grads", default=None)
    parser.add_argument("--dump_params", default=None)
    options = parser.parse_args(argv[:split])
    nonfinite = {int(item) for item in options.nonfinite_micro_steps.split(",") if item}
    calls, runs = {"micro": 0, "updates": 0}, []

    forward_loss, apply_update = training_run.forward_loss, training_run.apply_update

    def faulty_forward_loss(model, batch, output_composition):
        outputs = forward_loss(model, batch, output_composition)
        if calls["micro"] in nonfinite:
            outputs.loss = outputs.loss * float("nan")
        calls["micro"] += 1
        if options.sleep_per_step:
            time.sleep(options.sleep_per_step)
        return outputs

    def recording_apply_update(run):
        if options.dump_grads and calls["updates"] == 0 and run.accelerator.is_main_process:
            grads = {
                n: p.grad.detach().cpu().contiguous()
                for n, p in run.unwrapped.named_parameters()
                if p.grad is not None
            }
            save_file(grads, options.dump_grads)
        calls["updates"] += 1
        runs[:] = [run]
        apply_update(run)

    training_run.forward_loss, training_run.apply_update = faulty_forward_loss, recording_apply_update
    # train.py run as `python train.py` runs it: its one-line errors and exit status.
    sys.argv = [str(TRAIN_SCRIPT), *argv[split + 1 :]]
    try:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise
    if options.dump_params:
        from accelerate import PartialState

        folder = Path(options.dump_params)
        folder.mkdir(parents=True, exist_ok=True)
        model = runs[-1].unwrapped  # the trained model: evaluation and saving leave its parameters as they are
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.named_parameters()}
        save_file(state, str(folder / f"params_rank{PartialState().process_index}.safetensors"))


if __name__ == "__main__":
    main()
