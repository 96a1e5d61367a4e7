"""Every loader on a tiny tree in its official layout (with a missing and a corrupt image), and the FashionIQ / CIRR
loaders on the real annotation files."""

import json
import logging
from collections import Counter

import pytest
import torch
from datasets import Dataset, Image
from PIL import Image as PILImage

from processing.data import registry
from processing.data.folder_datasets import MITSTATES_TEST_NOUNS, fashioniq_caption, replacement_text
from processing.data.loaders import (
    CIREvaluationData,
    evaluation_data_from_hf,
    from_hf_dataset,
    load_evaluation_data,
    load_training_queries,
)
from processing.data.metrics import evaluate_protocol
from processing.data.registry import PROTOCOL_KS, DatasetSpec, dataset_names, get_dataset_spec, register_dataset

from utils import ANNOTATION_FIXTURES, make_cirr, write_corrupt, write_image


LOGGER = "processing.data.loaders"


def skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def assert_one_skip_warning(caplog, missing: int, corrupt: int) -> None:
    messages = [m for m in skip_warnings(caplog) if "unusable images" in m]
    assert len(messages) == 1, messages
    assert f"skipped {missing + corrupt} unusable images ({missing} missing, {corrupt} corrupt" in messages[0]


# ---------------------------------------------------------------------------------------------------- FashionIQ


@pytest.fixture
def fashioniq_dir(tmp_path):
    root = tmp_path / "fashioniq"
    dress = [
        {"candidate": "D1", "target": "D2", "captions": ["is red.", " has long sleeves?"]},
        {"candidate": "D2", "target": "D3", "captions": ["is blue", "shorter"]},
        {"candidate": "DMISSING", "target": "D1", "captions": ["a", "b"]},
        {"candidate": "D3", "target": "DCORRUPT", "captions": ["c", "d"]},
    ]
    shirt = [{"candidate": "S1", "target": "S2", "captions": ["is green", "plain"]}]
    for split in ("train", "val"):
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.dress.{split}.json").write_text(json.dumps(dress))
        (root / "captions" / f"cap.shirt.{split}.json").write_text(json.dumps(shirt))
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "image_splits" / f"split.dress.{split}.json").write_text(json.dumps(["D1", "D2", "D3", "DCORRUPT"]))
        (root / "image_splits" / f"split.shirt.{split}.json").write_text(json.dumps(["S1", "S2", "D1"]))
    (root / "captions" / "cap.dress.test.json").write_text(json.dumps([{"candidate": "D1", "captions": ["x", "y"]}]))
    (root / "image_splits" / "split.dress.test.json").write_text(json.dumps(["D1", "D2"]))
    for name in ("D1", "D2", "S1", "S2"):
        write_image(root / "images" / f"{name}.png")
    write_image(root / "images" / "D3.jpg", fmt="JPEG")  # .jpg is accepted too
    write_corrupt(root / "images" / "DCORRUPT.png")
    return root


def test_fashioniq_caption_join():
    assert fashioniq_caption(["is red.", " has long sleeves?"]) == "is red and has long sleeves"


def test_fashioniq_training(fashioniq_dir, caplog):
    train = load_training_queries("fashioniq", fashioniq_dir, "train", categories=["dress"])
    assert train.column_names[:3] == ["reference_image", "modification_text", "target_image"]
    assert list(train["reference_id"]) == ["D1", "D2"]
    assert list(train["modification_text"]) == ["is red and has long sleeves", "is blue and shorter"]
    assert_one_skip_warning(caplog, missing=1, corrupt=1)
    row = train[1]
    assert isinstance(row["reference_image"], PILImage.Image) and row["target_image"].format == "JPEG"

    both = load_training_queries(
        "fashioniq", fashioniq_dir, "train", categories=["dress", "shirt"], both_caption_orders=True
    )
    texts = list(both["modification_text"])
    assert texts[:2] == ["is red and has long sleeves", "has long sleeves and is red"]
    assert Counter(both["category"]) == {"dress": 4, "shirt": 2}


def test_fashioniq_evaluation(fashioniq_dir, caplog):
    data = load_evaluation_data("fashioniq", fashioniq_dir, "val", categories=("dress", "shirt"))
    assert isinstance(data, CIREvaluationData) and data.protocol == "fashioniq" and data["protocol"] == "fashioniq"
    # no query is dropped: dress-2's reference is missing (a miss), dress-3's target is corrupt (not in the gallery)
    assert list(data.queries["query_id"]) == ["dress-0", "dress-1", "dress-2", "dress-3", "shirt-0"]
    assert list(data.queries["category"]) == ["dress"] * 4 + ["shirt"]
    assert data.unusable_query_ids == {"dress-2"}
    # per-category galleries; the corrupt image is dropped, D1 appears once per category it is listed in
    assert list(zip(data.gallery["image_id"], data.gallery["category"])) == [
        ("D1", "dress"), ("D2", "dress"), ("D3", "dress"), ("S1", "shirt"), ("S2", "shirt"), ("D1", "shirt"),
    ]  # fmt: skip
    assert_one_skip_warning(caplog, missing=1, corrupt=1)
    # metrics run on the result
    embeds = torch.nn.functional.normalize(torch.randn(len(data.gallery), 4), dim=-1)
    oracle = embeds[[1, 2, 0, 2, 4]]  # each query's target (dress-2 and dress-3 point at other images)
    result = evaluate_protocol(
        "fashioniq", oracle, embeds, data.queries, data.gallery, ks=(1, 2), unusable_query_ids=data.unusable_query_ids
    )
    assert set(result) >= {"dress_recall@1", "shirt_recall@2", "average"}
    assert result["dress_recall@1"] == 50.0 and result["shirt_recall@1"] == 100.0 and result["unusable_queries"] == 1

    test = load_evaluation_data("fashioniq", fashioniq_dir, "test", categories=["dress"])
    assert list(test.queries["target_id"]) == [None] and not test.has_targets


def test_fashioniq_layout_errors(fashioniq_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)cap\.toptee\.val\.json.*captions/cap\."):
        load_evaluation_data("fashioniq", fashioniq_dir, "val", categories=["toptee"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_evaluation_data("fashioniq", tmp_path / "nowhere", "val")
    with pytest.raises(ValueError, match="split"):
        load_evaluation_data("fashioniq", fashioniq_dir, "training")
    with pytest.raises(ValueError, match="categories"):
        load_evaluation_data("fashioniq", fashioniq_dir, "val", categories=["hat"])
    with pytest.raises(ValueError, match="no targets"):
        load_training_queries("fashioniq", fashioniq_dir, "test", categories=["dress"])


@pytest.mark.parametrize("fixtures", ANNOTATION_FIXTURES)
def test_fashioniq_real_annotations_counts(fixtures):
    data = load_evaluation_data("fashioniq", fixtures / "fashioniq", "val", check_images="none")
    captions = {
        category: json.loads((fixtures / "fashioniq" / "captions" / f"cap.{category}.val.json").read_text())
        for category in ("dress", "shirt", "toptee")
    }
    assert Counter(data.queries["category"]) == {category: len(rows) for category, rows in captions.items()}
    if fixtures.name != "fixtures":  # the full files: the published counts
        assert Counter(data.queries["category"]) == {"dress": 2017, "shirt": 2038, "toptee": 1961}
    for category in ("dress", "shirt", "toptee"):
        names = json.loads((fixtures / "fashioniq" / "image_splits" / f"split.{category}.val.json").read_text())
        assert Counter(data.gallery["category"])[category] == len(names)
    assert data.queries["modification_text"][0] == fashioniq_caption(captions["dress"][0]["captions"])
    assert data.has_targets
    test = load_evaluation_data("fashioniq", fixtures / "fashioniq", "test", check_images="none")
    assert not test.has_targets


# ---------------------------------------------------------------------------------------------------- CIRR


def test_cirr_documented_layout(tmp_path, caplog):
    root = tmp_path / "data" / "cirr"
    make_cirr(root, root / "img_raw")
    data = load_evaluation_data("cirr", root, "val")
    assert data.protocol == "cirr"
    # pair 2 (target corrupt) and pair 3 (reference missing) stay as misses; the gallery loses both images
    assert list(data.queries["query_id"]) == ["1", "2", "3"] and list(data.queries["pair_id"]) == [1, 2, 3]
    assert data.unusable_query_ids == {"3"}
    assert list(data.queries["subset_ids"])[0] == ["dev-0-0-img0", "dev-1-0-img0", "dev-2-0-img0"]
    assert list(data.gallery["image_id"]) == ["dev-0-0-img0", "dev-1-0-img0", "dev-3-0-img0"]
    assert_one_skip_warning(caplog, missing=1, corrupt=1)
    assert data.gallery[0]["image"].size == (8, 8)

    train = load_training_queries("cirr", root, "train")
    assert list(train["modification_text"]) == ["a red car", "zoom in"]
    assert train[1]["target_image"].size == (8, 8)  # train/<n>/ sub-folders resolve

    test = load_evaluation_data("cirr", root, "test")
    assert list(test.queries["target_id"]) == [None] and len(test.gallery) == 3


def test_cirr_alternative_layouts_and_errors(tmp_path):
    # images next to `cirr/` (the layout several public code bases use), data_dir = the folder above `cirr/`
    root = tmp_path / "cirr_dataset"
    make_cirr(root / "cirr", root)
    data = load_evaluation_data("cirr", root, "validation", check_images="exists")
    assert len(data.gallery) == 4  # exists-mode keeps the corrupt file, only the missing one goes
    with pytest.raises(FileNotFoundError, match=r"img_raw"):
        empty = tmp_path / "annotations_only" / "cirr"
        make_cirr(empty, tmp_path / "elsewhere")
        load_evaluation_data("cirr", empty, "val")
    with pytest.raises(FileNotFoundError, match="captions"):
        load_evaluation_data("cirr", tmp_path, "val")


@pytest.mark.parametrize("fixtures", ANNOTATION_FIXTURES)
def test_cirr_real_annotations_counts(fixtures):
    val = load_evaluation_data("cirr", fixtures / "cirr", "val", check_images="none")
    val_captions = json.loads((fixtures / "cirr" / "captions" / "cap.rc2.val.json").read_text())
    val_images = json.loads((fixtures / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    assert len(val.queries) == len(val_captions) and len(val.gallery) == len(val_images)
    if fixtures.name != "fixtures":  # the full files: the published counts
        assert len(val.queries) == 4181 and len(val.gallery) == 2297
    assert all(len(members) == 6 for members in val.queries["subset_ids"])
    test = load_evaluation_data("cirr", fixtures / "cirr", "test1", check_images="none")
    test_captions = json.loads((fixtures / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    assert len(test.queries) == len(test_captions) and not test.has_targets
    # with check_images="none" the documented image folder is assumed
    undecoded = val.queries.cast_column("reference_image", Image(decode=False))
    assert undecoded[0]["reference_image"]["path"].endswith("cirr/img_raw/dev/dev-244-0-img0.png")


# ---------------------------------------------------------------------------------------------------- Fashion200k


@pytest.fixture
def fashion200k_dir(tmp_path):
    root = tmp_path / "fashion200k"
    train = [
        ("women/dresses/1/1_0.jpeg", "red silk dress"),
        ("women/dresses/2/2_0.jpeg", "blue silk dress"),
        ("women/dresses/3/3_0.jpeg", "red cotton dress"),
        ("women/dresses/4/4_0.jpeg", "green wool coat"),
        ("women/dresses/5/5_0.jpeg", "blue silk dress"),
    ]
    test = [
        ("women/tops/1/1_0.jpeg", "black lace top"),
        ("women/tops/2/2_0.jpeg", "white lace top"),
        ("women/tops/3/3_0.jpeg", "white lace top"),
        ("women/tops/4/4_0.jpeg", "black silk top"),
        ("women/tops/5/5_0.jpeg", "black lace top"),  # missing
        ("women/tops/6/6_0.jpeg", "black lace top"),  # corrupt
    ]
    (root / "labels").mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        lines = [f"{path}\t0.{i}\t{caption}" for i, (path, caption) in enumerate(rows)]
        (root / "labels" / f"dress_{split}_detect_all.txt").write_text("\n".join(lines) + "\n")
    for path, _ in train + test[:4]:
        write_image(root / path, fmt="JPEG")
    write_corrupt(root / test[5][0])
    (root / "test_queries.txt").write_text(
        "women/tops/1/1_0.jpeg women/tops/2/2_0.jpeg\n"
        "women/tops/4/4_0.jpeg women/tops/1/1_0.jpeg\n"
        "women/tops/5/5_0.jpeg women/tops/4/4_0.jpeg\n"
    )
    return root


def test_replacement_text():
    assert replacement_text("black lace top", "white lace top") == "replace black with white"
    assert replacement_text("black silk top", "black lace top") == "replace silk with lace"


def test_fashion200k_evaluation(fashion200k_dir, caplog):
    data = load_evaluation_data("fashion200k", fashion200k_dir, "test")
    assert data.protocol == "fashion200k"
    # the third query's reference is missing: kept, and counted as a miss
    assert list(data.queries["modification_text"]) == [
        "replace black with white",
        "replace silk with lace",
        "replace lace with silk",
    ]
    assert list(data.queries["target_caption"]) == ["white lace top", "black lace top", "black silk top"]
    assert list(data.queries["reference_id"]) == [
        "women/tops/1/1_0.jpeg",
        "women/tops/4/4_0.jpeg",
        "women/tops/5/5_0.jpeg",
    ]
    assert data.unusable_query_ids == {"2"}
    assert list(data.gallery["caption"]) == ["black lace top", "white lace top", "white lace top", "black silk top"]
    assert_one_skip_warning(caplog, missing=1, corrupt=1)
    # query 0 retrieving image 3 (another "white lace top") is a hit; its own image is removed
    gallery = torch.eye(4)
    # query 1's own image (index 3) is removed, leaving a "white lace top": a miss
    # the third (unusable) query would retrieve the "black silk top" from its blank embedding: it must not count
    queries = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.5, 0.2, 1.0], [0.0, 0.0, 0.0, 1.0]]), dim=-1
    )
    result = evaluate_protocol(
        "fashion200k",
        queries,
        gallery,
        data.queries,
        data.gallery,
        ks=(1, 2),
        unusable_query_ids=data.unusable_query_ids,
    )
    assert result == {"recall@1": pytest.approx(100 / 3), "recall@2": pytest.approx(100 / 3), "unusable_queries": 1}


def test_fashion200k_training_pairs_differ_by_one_word(fashion200k_dir):
    train = load_training_queries("fashion200k", fashion200k_dir, "train", pairs_per_image=2, seed=3)
    again = load_training_queries("fashion200k", fashion200k_dir, "train", pairs_per_image=2, seed=3)
    assert list(train["target_id"]) == list(again["target_id"])
    # the coat has no caption one word away: no pairs for it
    assert "women/dresses/4/4_0.jpeg" not in set(train["reference_id"])
    assert len(train) == 8
    for source, target, text in zip(train["reference_caption"], train["target_caption"], train["modification_text"]):
        source_words, target_words = source.split(), target.split()
        assert len(source_words) == len(target_words)
        assert sum(a != b for a, b in zip(source_words, target_words)) == 1
        assert text == replacement_text(source, target)


def test_fashion200k_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"labels/\*_test_detect_all\.txt"):
        load_evaluation_data("fashion200k", tmp_path, "test")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "x_test_detect_all.txt").write_text("a.jpg\t1\tred top\n")
    with pytest.raises(FileNotFoundError, match="test_queries.txt"):
        load_evaluation_data("fashion200k", tmp_path, "test", check_images="none")


# ---------------------------------------------------------------------------------------------------- MIT-States


@pytest.fixture
def mitstates_dir(tmp_path):
    root = tmp_path / "mitstates"
    assert "castle" in MITSTATES_TEST_NOUNS and "apple" not in MITSTATES_TEST_NOUNS
    layout = {
        "ancient castle": 2, "ruined castle": 1, "huge castle": 1, "adj castle": 3,  # test noun
        "sliced apple": 2, "ripe apple": 1,  # train noun
        "broken fan": 1,  # a test noun with one adjective: no queries
    }  # fmt: skip
    for folder, count in layout.items():
        for i in range(count):
            write_image(root / "images" / folder / f"img_{i}.jpg", fmt="JPEG")
    write_corrupt(root / "images" / "huge castle" / "img_bad.jpg")
    return root


def test_mitstates_evaluation(mitstates_dir, caplog):
    data = load_evaluation_data("mitstates", mitstates_dir, "test")
    assert data.protocol == "mitstates"
    # castle: ancient ×2, ruined, huge (the corrupt one dropped); fan: broken. "adj castle" is ignored.
    assert Counter(data.gallery["caption"]) == {
        "ancient castle": 2,
        "ruined castle": 1,
        "huge castle": 1,
        "broken fan": 1,
    }
    # every castle image × the 2 other castle adjectives; the fan has none
    assert len(data.queries) == 4 * 2
    first = data.queries.select_columns(["reference_id", "modification_text", "target_caption", "target_id"])[0]
    assert first == {
        "reference_id": "ancient castle/img_0.jpg",
        "modification_text": "huge",
        "target_caption": "huge castle",
        "target_id": None,
    }
    assert_one_skip_warning(caplog, missing=0, corrupt=1)


def test_mitstates_training(mitstates_dir):
    train = load_training_queries("mitstates", mitstates_dir, "train", pairs_per_image=3, seed=1)
    assert set(train["reference_caption"]) == {"sliced apple", "ripe apple"}
    for text, source, target in zip(train["modification_text"], train["reference_caption"], train["target_caption"]):
        assert target == f"{text} apple" and source != target
    assert len(train) == 9


# ---------------------------------------------------------------------------------------------------- files / hub


@pytest.fixture
def files_dir(tmp_path):
    root = tmp_path / "mydata"
    for name in ("a", "b", "c", "d"):
        write_image(root / "img" / f"{name}.png")
    write_corrupt(root / "img" / "bad.png")
    rows = [
        {"reference": "img/a.png", "text": "make it blue", "target": "img/b.png"},
        {"reference": "img/b.png", "text": "add a dog", "target": "img/c.png"},
        {"reference": "img/missing.png", "text": "x", "target": "img/a.png"},
        {"reference": "img/c.png", "text": "y", "target": "img/bad.png"},
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (root / "test.csv").write_text(
        "reference,text,target\nimg/a.png,make it blue,img/b.png\nimg/c.png,zoom,img/d.png\n"
    )
    gallery_dir = root / "galleries"
    gallery_dir.mkdir()
    (gallery_dir / "gallery.jsonl").write_text(
        "\n".join(json.dumps({"image": f"../img/{n}.png", "id": f"id-{n}"}) for n in ("a", "b", "c", "d")) + "\n"
    )
    return root


def test_files_training_and_skips(files_dir, caplog):
    train = load_training_queries("files", files_dir / "train.jsonl", "train")
    assert list(train["modification_text"]) == ["make it blue", "add a dog"]
    assert list(train["target_id"]) == ["img/b.png", "img/c.png"]
    assert_one_skip_warning(caplog, missing=1, corrupt=1)
    assert train[0]["target_image"].size == (8, 8)
    same = load_training_queries("files", files_dir, "train")  # folder mode finds train.jsonl
    assert list(same["reference_id"]) == list(train["reference_id"])


def test_files_evaluation_with_and_without_gallery(files_dir):
    data = load_evaluation_data("files", files_dir / "test.csv", "test", remove_reference=True)
    assert data.protocol == "exact" and data.remove_reference
    assert list(data.gallery["image_id"]) == ["img/a.png", "img/b.png", "img/c.png", "img/d.png"]
    with_gallery = load_evaluation_data(
        "files", files_dir / "test.csv", "test", gallery_file=files_dir / "galleries" / "gallery.jsonl"
    )
    assert list(with_gallery.gallery["image_id"]) == ["id-a", "id-b", "id-c", "id-d"]
    assert list(with_gallery.queries["target_id"]) == ["id-b", "id-d"]
    assert list(with_gallery.queries["reference_id"]) == ["id-a", "id-c"]


def test_files_errors(files_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="reference"):
        load_training_queries("files", tmp_path / "nope.jsonl", "train")
    bad = tmp_path / "bad.csv"
    bad.write_text("ref,text,target\na.png,x,b.png\n")
    with pytest.raises(ValueError, match=r"missing \['reference'\]"):
        load_training_queries("files", bad, "train")
    renamed = load_training_queries("files", bad, "train", reference_column="ref", check_images="none")
    assert list(renamed["reference_id"]) == ["a.png"]


def test_from_hf_dataset(files_dir):
    raw = Dataset.from_dict(
        {
            "src": [str(files_dir / "img" / "a.png"), str(files_dir / "img" / "c.png")],
            "caption": ["make it blue", "zoom"],
            "dst": [str(files_dir / "img" / "b.png"), str(files_dir / "img" / "a.png")],
            "src_id": ["a", "c"],
            "dst_id": ["b", "a"],
        }
    )
    train = from_hf_dataset(raw, "src", "caption", "dst")
    assert train.column_names == ["reference_image", "modification_text", "target_image"]
    assert train[0]["reference_image"].size == (8, 8)
    data = evaluation_data_from_hf(raw, "src", "caption", "dst", "src_id", "dst_id")
    assert sorted(data.gallery["image_id"]) == ["a", "b", "c"]
    assert list(data.queries["query_id"]) == ["0", "1"]
    with pytest.raises(ValueError, match="not in the dataset"):
        from_hf_dataset(raw, "image", "caption", "dst")
    with pytest.raises(ValueError, match="reference_id_column"):
        evaluation_data_from_hf(raw, "src", "caption", "dst")


def test_dispatch_errors():
    with pytest.raises(ValueError, match="must be one of"):
        load_training_queries("coco", "x", "train")
    with pytest.raises(ValueError, match="data_dir"):
        load_evaluation_data("cirr", None, "val")
    with pytest.raises(TypeError):
        load_evaluation_data("cirr", "x", "val", not_an_option=True)


# ---------------------------------------------------------------------------------------------------- registry


def test_one_return_type_per_entry_point(files_dir):
    # The split name no longer decides the type: a "test" file read for training is a training table.
    train = load_training_queries("files", files_dir / "test.csv", "test", check_images="none")
    assert isinstance(train, Dataset) and "target_image" in train.column_names
    data = load_evaluation_data("files", files_dir / "train.jsonl", "train", check_images="none")
    assert isinstance(data, CIREvaluationData) and "target_image" not in data.queries.column_names


def test_registry_holds_every_fact_of_a_dataset():
    assert {"shapes", "fashioniq", "cirr", "fashion200k", "mitstates", "files", "hub"} <= set(dataset_names())
    cirr, fashioniq, shapes = get_dataset_spec("cirr"), get_dataset_spec("fashioniq"), get_dataset_spec("shapes")
    assert cirr.default_splits == ("val", None, "test1") and cirr.headline_metric == "average"
    assert cirr.recall_ks == PROTOCOL_KS["cirr"] == (1, 5, 10, 50)
    assert fashioniq.display_name == "FashionIQ" and fashioniq.recall_ks == (10, 50)
    assert "both_caption_orders" in fashioniq.options
    assert shapes.data_dir == "none" and shapes.validation_split == "validation"
    with pytest.raises(ValueError, match="must be one of"):
        get_dataset_spec("coco")
    with pytest.raises(ValueError, match="protocol"):
        DatasetSpec("x", "X", "no-such-protocol", "test", load_training_queries, load_evaluation_data)


def test_adding_a_dataset_is_one_registration(files_dir, monkeypatch):
    """A new dataset is one `register_dataset` call next to its loader: the entry points then serve it."""
    monkeypatch.setitem(registry.DATASETS, "pairs", None)  # removed again after the test
    del registry.DATASETS["pairs"]

    def load_training(data_dir, split="train", **options):
        return load_training_queries("files", data_dir, split, **options)

    def load_evaluation(data_dir, split, **options):
        return load_evaluation_data("files", data_dir, split, **options)

    register_dataset(DatasetSpec("pairs", "My pairs", "exact", "test", load_training, load_evaluation))
    assert "pairs" in dataset_names()
    assert len(load_training_queries("pairs", files_dir / "train.jsonl", check_images="none")) == 4
    assert load_evaluation_data("pairs", files_dir / "test.csv", check_images="none").protocol == "exact"
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetSpec("pairs", "Other", "exact", "test", load_training, load_evaluation))


def test_a_modification_type_column_reaches_the_evaluation_queries(files_dir, tmp_path):
    """files: an optional `modification_type` column; --dataset_name: `modification_type_column`."""
    typed = files_dir / "typed.csv"
    typed.write_text(
        "reference,text,target,modification_type\nimg/a.png,make it blue,img/b.png,colour\nimg/c.png,zoom,img/d.png,\n"
    )
    data = load_evaluation_data("files", typed, "test")
    assert list(data.queries["modification_type"]) == ["colour", "unlabelled"]
    assert (
        "modification_type" not in load_evaluation_data("files", files_dir / "test.csv", "test").queries.column_names
    )
    raw = Dataset.from_dict(
        {
            "src": [str(files_dir / "img" / "a.png")], "caption": ["make it blue"], "dst": [str(files_dir / "img" / "b.png")],
            "src_id": ["a"], "dst_id": ["b"], "kind": ["colour"],
        }
    )  # fmt: skip
    hub = evaluation_data_from_hf(raw, "src", "caption", "dst", "src_id", "dst_id", modification_type_column="kind")
    assert list(hub.queries["modification_type"]) == ["colour"]
