"""The training application of MQIRTN (never shipped to the Hub), run by `train.py`:

- `arguments`: the command line (standard library only, so `--help` answers at once);
- `data`: the splits of a run, through the dataset registry;
- `model`: the model and processor of a run, frozen towers, optimiser groups;
- `frozen_text`: a frozen text tower's token states computed once per distinct text;
- `run`: the accelerator and `TrainingRun` (the loop, resuming, logging, validation, guards);
- `checkpoints`: checkpoints and the final model save, both atomic, and the finiteness guard;
- `evaluation`: embeddings, Recall@K, the results table and figures, CIRR submissions;
- `diagnostics`: what the composition does, logged and written to `eval_results.json`;
- `publishing`: `eval_results.json`, the model card, the Hub upload;
- `errors`: the errors a user can cause, reported as one line;
- `versions`: the library versions a run records (they decide its weights bit for bit).

Modules are imported on their own; this package imports nothing.
"""
