"""The data of a training run: every split it needs, loaded through the dataset registry."""

from __future__ import annotations

from processing.data.loaders import load_evaluation_data, load_training_queries
from processing.data.registry import dataset_names, get_dataset_spec
from processing.data.transforms import select_first


# Everything about a dataset comes from its registry entry (processing/data/registry.py): `--dataset` choices (a
# `datasets` dataset comes through --dataset_name instead), per dataset (evaluation split, model-selection split
# during training, split of --do_predict), and the metric that selects the best model.
DATASETS = tuple(name for name in dataset_names() if get_dataset_spec(name).data_dir != "dataset")
DEFAULT_SPLITS = {name: get_dataset_spec(name).default_splits for name in dataset_names()}


def loader_options(args, split: str) -> dict:
    """The options of `args.source`'s loader (its registry entry names them) filled from the command line."""
    shapes_sizes = {
        "train": args.shapes_num_train_queries,
        "validation": args.shapes_num_validation_queries,
        "val": args.shapes_num_validation_queries,
        "test": args.shapes_num_test_queries,
    }
    available = {
        "check_images": args.check_images,
        "both_caption_orders": args.both_caption_orders,
        "num_queries": shapes_sizes.get(split),
        "image_size": args.image_size,
        "seed": args.shapes_seed,
        "cache_dir": args.shapes_cache_dir,
        "dataset_config_name": args.dataset_config_name,
        "reference_image_column": args.reference_column,
        "text_column": args.text_column,
        "target_image_column": args.target_column,
        "reference_id_column": args.reference_id_column,
        "target_id_column": args.target_id_column,
        "modification_type_column": args.modification_type_column,
    }
    return {name: available[name] for name in get_dataset_spec(args.source).options}


def load_split(args, split: str, evaluation: bool):
    """Training `datasets.Dataset` (evaluation=False) or `CIREvaluationData` of one split, through the registry."""
    data_dir = args.dataset_name if args.source == "hub" else args.data_dir
    options = loader_options(args, split)
    if evaluation:
        return load_evaluation_data(args.source, data_dir, split, **options)
    return load_training_queries(args.source, data_dir, split, **options)


def load_data(args, accelerator) -> dict:
    """Every split the run needs; rank 0 generates/caches the data first, the others then read the cache."""
    with accelerator.main_process_first():
        return {
            "train": None
            if args.eval_only
            else select_first(load_split(args, args.train_split, False), args.max_train_samples),
            "eval": load_split(args, args.eval_split, True) if (args.do_eval or args.eval_only) else None,
            "validation": load_split(args, args.validation_split, True) if args.eval_steps else None,
            "predict": load_split(args, args.predict_split, True) if args.do_predict else None,
        }
