"""The model card train.py writes: YAML that huggingface_hub reads back offline (`ModelCard.load`, `metadata_load`,
`model_index_to_eval_results`), the license of setup.cfg, base models and datasets only as Hub ids (never a local
path), one metric type per metric, the pipeline's Hub task, metrics rounded to 4 decimals."""

import argparse
import configparser

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from mqirtn_app.model_card import LICENSE, TASK_TYPE, is_hub_id, metric_type, rounded, write_model_card

from utils import REPO_ROOT


RESULTS = {
    "test": {"recall@1": 5.000000074505806, "recall@5": 33.33333333, "recall_subset@1": 12.5, "average": 20.123456}
}


def read_card(path):
    card = ModelCard.load(path)
    metadata = metadata_load(path)
    model_name, eval_results = model_index_to_eval_results(metadata["model-index"])
    return card, metadata, model_name, eval_results


def test_license_is_setup_cfgs():
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert setup["metadata"]["license"].lower() == LICENSE


@pytest.mark.parametrize(
    "dataset, hub_dataset_name, expected_datasets, expected_type",
    [
        ("shapes", None, None, "shapes"),
        ("hub", "someone/cir-data", ["someone/cir-data"], "someone/cir-data"),
        ("hub", "LOCAL", None, "my_local_data"),  # a local path: its folder name only, never the path
    ],
)
def test_card_yaml_validates_offline(tmp_path, dataset, hub_dataset_name, expected_datasets, expected_type):
    if hub_dataset_name == "LOCAL":
        hub_dataset_name = str(tmp_path / "private" / "my_local_data")
        (tmp_path / "private" / "my_local_data").mkdir(parents=True)
    folder = tmp_path / "model"
    folder.mkdir()
    path = write_model_card(
        folder, RESULTS, {"steps": 10}, dataset, "mqirtn", hub_dataset_name=hub_dataset_name,
        base_models=["google/vit-base-patch16-224-in21k", str(tmp_path)], hub_model_id="someone/mqirtn-x",
    )  # fmt: skip
    card, metadata, model_name, eval_results = read_card(path)
    assert metadata["license"] == "apache-2.0" and card.data.license == "apache-2.0"
    assert metadata["base_model"] == ["google/vit-base-patch16-224-in21k"]  # the local folder is left out
    assert metadata.get("datasets") == expected_datasets
    assert metadata["pipeline_tag"] == TASK_TYPE and metadata["library_name"] == "transformers"
    assert model_name == "mqirtn-x" and len(eval_results) == 4
    for result in eval_results:
        assert (
            result.task_type == TASK_TYPE and result.dataset_type == expected_type and result.dataset_split == "test"
        )
    types = {result.metric_name: result.metric_type for result in eval_results}
    assert types == {
        "recall@1": "recall_at_1",
        "recall@5": "recall_at_5",
        "recall_subset@1": "recall_subset_at_1",
        "average": "average",
    }
    values = {result.metric_name: result.metric_value for result in eval_results}
    assert values == {"recall@1": 5.0, "recall@5": 33.3333, "recall_subset@1": 12.5, "average": 20.1235}
    text = path.read_text()
    assert str(tmp_path) not in text  # no local path anywhere in the card
    assert "embed_gallery" in text and "someone/mqirtn-x" in text


def test_hub_ids_and_metric_types(tmp_path):
    assert is_hub_id("someone/data") and is_hub_id("bert-base-uncased") and is_hub_id("org/name.v2")
    for local in ("/abs/path", "./rel", "../up", "a/b/c", "~/data", str(tmp_path)):
        assert not is_hub_id(local), local
    (tmp_path / "data").mkdir()
    assert not is_hub_id(str(tmp_path / "data"))
    assert metric_type("dress_recall@10") == "dress_recall_at_10" and metric_type("recall@50") == "recall_at_50"


def test_rounded_rounds_every_float_to_four_decimals():
    record = {"test": {"recall@1": 5.000000074505806}, "training": {"steps": 3, "loss": [0.123456789, 1]}, "name": "x"}
    assert rounded(record) == {"test": {"recall@1": 5.0}, "training": {"steps": 3, "loss": [0.1235, 1]}, "name": "x"}


def test_card_base_models_name_the_hub_model_a_run_fine_tunes(tmp_path):
    from mqirtn_train.publishing import card_base_models

    args = argparse.Namespace(model_name_or_path="someone/mqirtn-base", text_model_name_or_path=None,
                              vision_model_name_or_path=None, text_from_scratch=False)  # fmt: skip
    assert card_base_models(args) == ["someone/mqirtn-base"]
    args.model_name_or_path = str(tmp_path)
    assert card_base_models(args) == []
