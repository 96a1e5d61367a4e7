#!/usr/bin/env python
"""Train and evaluate MQIRTN for composed image retrieval with 🤗 Accelerate.

With no arguments it runs the embedded default: train on the built-in `shapes` benchmark (a small ViT from scratch
and the pretrained all-MiniLM-L6-v2 text tower), evaluate on its test split, print the Recall@K table and save the
model to `outputs/mqirtn-shapes`:

    accelerate launch train.py

Everything else (FashionIQ, CIRR, Fashion200k, MIT-States, your own files or any `datasets` dataset; several
processes or machines; checkpoints, resuming, evaluation only, CIRR submissions, the Hub) is a flag away; see
`--help` and docs/training.md. This script is the steps of a run; the pieces live in the `mqirtn_train` package
(arguments, data, model, run, checkpoints, evaluation, publishing), the model in `modeling_mqirtn/` and the data code
in `processing/`.
"""

import sys
import time

from mqirtn_train.arguments import build_parser, parse_args


# `--help` answers here, before torch, transformers and the data code are imported (seconds): the parser needs none
# of them (the dataset and composition names it checks are read on the first parse).
if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    build_parser().parse_args()

from accelerate.logging import get_logger  # noqa: E402

from mqirtn_train.data import load_data  # noqa: E402
from mqirtn_train.errors import run_from_command_line  # noqa: E402
from mqirtn_train.evaluation import evaluate_and_predict  # noqa: E402
from mqirtn_train.model import prepare_model  # noqa: E402
from mqirtn_train.publishing import save_and_publish  # noqa: E402
from mqirtn_train.run import TrainingProgress, TrainingRun, setup_accelerator  # noqa: E402


logger = get_logger(__name__)


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments: parsed and checked against each other (a flag that cannot apply is refused, never ignored).
    args = parse_args(argv)
    start_time = time.time()
    # 2. The accelerator, logging, the seed, the output folder (and the Hub repository, checked before any work).
    accelerator = setup_accelerator(args)
    # 3. The model and processor (saved, or built from towers), frozen towers, the frozen-text cache.
    model, processor, pretrained_prefixes = prepare_model(args, accelerator)
    # 4. Every split the run needs, through the dataset registry.
    data = load_data(args, accelerator)
    run, card, training_state, progress = None, {}, {}, TrainingProgress()
    if not args.eval_only:
        # 5. Dataloader, optimiser (three learning rates), schedule; resume from a checkpoint; train.
        run = TrainingRun(args, accelerator, model, processor, data["train"], pretrained_prefixes)
        run.resume()
        run.train(data["validation"])
        model, progress = run.model, run.progress
        card, training_state = run.summary(start_time)
    # 6. Recall@K on the evaluation split (table, figures); CIRR test-server files with --do_predict.
    results = evaluate_and_predict(args, accelerator, model, processor, data, training_state, progress.completed_steps)
    # 7. eval_results.json, the model and its card, the Hub.
    diagnostics = run.diagnostics if run else {}
    save_and_publish(args, accelerator, model, processor, results, training_state, diagnostics, card)
    accelerator.wait_for_everyone()
    logger.info(f"Done in {time.time() - start_time:.0f} s; model in {args.output_dir}")
    accelerator.end_training()
    return {"results": results, "progress": progress.state_dict(), "model": accelerator.unwrap_model(model)}


if __name__ == "__main__":
    sys.exit(run_from_command_line(main))
