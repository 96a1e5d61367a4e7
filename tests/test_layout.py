"""The layout rule a reader can see: the top-level `*_mqirtn.py` files of `modeling_mqirtn/` and
`processing/` are exactly the Hub code, which is what `save_pretrained` copies, and they import only torch,
transformers, numpy, PIL, the standard library and each other (`from .x import Y`); the data and application code
stays out of the way of `import processing` and `mqirtn --help`."""

import ast
import os
import subprocess
import sys
import time

import pytest

from modeling_mqirtn import save_for_hub

from utils import REPO_ROOT, tiny_model, tiny_processor


HUB_PACKAGES = ("modeling_mqirtn", "processing")
# huggingface_hub comes with transformers (the configuration's `@strict` dataclass validation is from there).
THIRD_PARTY = {"torch", "transformers", "numpy", "PIL", "huggingface_hub"}
# These run in every Hub user's process that loads a processor or the pipeline: nothing beyond transformers/torch, and
# of the siblings only the search (the pipeline's top-k).
PROCESSOR_AND_PIPELINE = {
    "processing_mqirtn.py": set(),
    "pipeline_mqirtn.py": {"search_mqirtn"},
    "search_mqirtn.py": set(),
}


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """The code files of a folder saved for the Hub (`save_for_hub`: model + processor after
    `register_for_auto_class`), by name."""
    folder = tmp_path_factory.mktemp("hub")
    save_for_hub(tiny_model(), tiny_processor(tmp_path_factory.mktemp("vocab")), folder)
    return {path.name: path.read_text() for path in folder.glob("*.py")}


def imports_of(source: str) -> list[tuple[int, str]]:
    """(level, module) of every import statement; `import a.b` gives (0, "a.b"), `from .x import y` (1, "x")."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_save_pretrained_copies_every_hub_file(hub_files, tmp_path_factory):
    """`save_pretrained` of model and processor (registered for the Auto classes on import) copies the defining files
    and what they import, the pipeline's included: the plain way of saving is as complete as `save_for_hub`."""
    folder = tmp_path_factory.mktemp("saved")
    tiny_model().save_pretrained(folder)
    tiny_processor(tmp_path_factory.mktemp("vocab")).save_pretrained(folder)
    assert {path.name for path in folder.glob("*.py")} == set(hub_files)


def test_saved_code_is_exactly_the_top_level_mqirtn_files(hub_files):
    top_level = {path.name for package in HUB_PACKAGES for path in (REPO_ROOT / package).glob("*_mqirtn.py")}
    assert set(hub_files) == top_level, "a top-level *_mqirtn.py file must ship, and only those ship"
    assert set(PROCESSOR_AND_PIPELINE) | {"configuration_mqirtn.py", "modeling_mqirtn.py"} <= top_level
    # Nothing else looks like Hub code: no `_mqirtn` suffix in subpackages or elsewhere in the packages.
    elsewhere = [
        path.relative_to(REPO_ROOT)
        for root in ("modeling_mqirtn", "processing", "mqirtn_app", "mqirtn_train")
        for path in (REPO_ROOT / root).rglob("*_mqirtn.py")
        if path.parent != REPO_ROOT / root
    ]
    assert not elsewhere
    assert not [path for root in ("mqirtn_app", "mqirtn_train") for path in (REPO_ROOT / root).glob("*_mqirtn.py")]


def test_hub_code_imports_only_allowed_modules(hub_files):
    for name, source in hub_files.items():
        for level, module in imports_of(source):
            where = f"{name}: {'.' * level}{module}"
            if level:
                # Flattened on the Hub: only `from .sibling import Y`, with the sibling shipped too.
                assert level == 1 and module and "." not in module, f"{where}: only `from .x import Y` works remotely"
                assert f"{module}.py" in hub_files, f"{where}: imports a file that does not ship"
                if name in PROCESSOR_AND_PIPELINE:
                    assert module in PROCESSOR_AND_PIPELINE[name], (
                        f"{where}: the processor and pipeline import no model code"
                    )
                continue
            top = module.split(".")[0]
            allowed = THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__"}
            if name in PROCESSOR_AND_PIPELINE:
                allowed = {"torch", "transformers", "numpy", "PIL"} | set(sys.stdlib_module_names) | {"__future__"}
            assert top in allowed, (
                f"{where}: Hub code may import only {sorted(THIRD_PARTY)}, the standard library and siblings"
            )


def test_hub_file_names_are_unique_across_both_folders():
    names = [path.name for package in HUB_PACKAGES for path in (REPO_ROOT / package).glob("*_mqirtn.py")]
    assert len(names) == len(set(names))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_import_processing_imports_no_data_code():
    completed = run_python(
        "import sys, processing\n"
        "print(sorted(m for m in sys.modules if m == 'datasets' or m.startswith(('processing.data', 'mqirtn_app'))))\n"
        "from processing import recall_at_k\n"
        "print('processing.data.metrics' in sys.modules)"
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split("\n")[:2] == ["[]", "True"], completed.stdout


def test_cli_parser_needs_neither_torch_nor_transformers():
    started = time.perf_counter()
    completed = run_python(
        "import sys\n"
        "from mqirtn_app import cli\n"
        "cli._build_parser().format_help()\n"
        "print(sorted({'torch', 'transformers', 'modeling_mqirtn', 'processing'} & set(sys.modules)))"
    )
    elapsed = time.perf_counter() - started
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"
    assert elapsed < 3.0, f"`mqirtn --help` took {elapsed:.1f} s"
