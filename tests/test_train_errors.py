"""`python train.py` reports the errors a user causes after argparse (bad values,
a config that cannot be built, a checkpoint that is not one) as one line and exit 1, and the path mistakes as argparse
usage errors: never a traceback."""

import pytest

from mqirtn_train.arguments import parse_args

from utils import TRAIN_DATA_ARGS, one_error_line, run_train_script


TINY_MODEL = [
    "--patch_size", "8", "--vision_hidden_size", "32", "--vision_num_hidden_layers", "1", "--vision_num_attention_heads", "2",
    "--text_from_scratch", "--text_hidden_size", "32", "--text_num_hidden_layers", "1", "--text_num_attention_heads", "2",
    "--projection_dim", "32", "--fusion_num_heads", "4", "--per_device_train_batch_size", "8", "--max_train_steps", "1",
]  # fmt: skip


@pytest.mark.parametrize(
    "case, expected",
    [("config", "`projection_dim` (33) must be divisible by `fusion_num_heads` (4)"),
     ("report_to", "Unsupported logging capability: foo"),
     ("text_dropout", "dropout probability has to be between 0 and 1"),
     ("resume", "it has no progress.json")],
)  # fmt: skip
def test_train_errors_after_argparse_are_one_line(tmp_path, monkeypatch, capsys, case, expected):
    monkeypatch.setenv("MQIRTN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "not_a_checkpoint").mkdir()
    extra = {
        "config": ["--config_overrides", "projection_dim=33"],
        "report_to": ["--report_to", "foo"],
        "text_dropout": ["--text_dropout", "5"],
        "resume": ["--resume_from_checkpoint", str(tmp_path / "not_a_checkpoint")],
    }[case]
    argv = [*TRAIN_DATA_ARGS, *TINY_MODEL, "--output_dir", str(tmp_path / "out"), "--no-do_eval", *extra]
    assert run_train_script(argv, monkeypatch) == 1
    assert expected in one_error_line(capsys, "train.py: error:")


@pytest.mark.parametrize("case", ["output_dir_is_a_file", "missing_model_folder"])
def test_train_path_mistakes_are_usage_errors(tmp_path, capsys, case):
    (tmp_path / "a_file").write_text("x")
    extra = {
        "output_dir_is_a_file": ["--output_dir", str(tmp_path / "a_file")],
        "missing_model_folder": [
            "--model_name_or_path",
            str(tmp_path / "no_model"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*TRAIN_DATA_ARGS, *extra])
    assert exit_info.value.code == 2  # argparse's usage block, then its one error line
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if ": error: " in line]
    assert ("is a file" if case == "output_dir_is_a_file" else "no such model folder") in line
