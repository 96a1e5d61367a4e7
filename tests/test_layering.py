"""Layering that shows in the imports: the data code never imports the model or the applications, the one top-k search
lives in a Hub file of its own that the pipeline, the index and the metrics import, and the dataset registry is
metadata (importing it imports neither torch nor transformers)."""

import ast
import os
import subprocess
import sys

from utils import REPO_ROOT


# The model package's files that data code may import: the search (torch only), nothing of the model itself.
DATA_MAY_IMPORT_FROM_MODEL = {"modeling_mqirtn.search_mqirtn"}
APPLICATIONS = ("mqirtn_app", "mqirtn_train", "train")


def imported_modules(path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_data_code_imports_neither_the_model_nor_the_applications():
    files = sorted((REPO_ROOT / "processing" / "data").glob("*.py"))
    assert len(files) >= 6
    for path in files:
        for module in imported_modules(path):
            where = f"{path.relative_to(REPO_ROOT)} imports {module}"
            if module.split(".")[0] == "modeling_mqirtn":
                known = {m for m in DATA_MAY_IMPORT_FROM_MODEL if module == m or module.startswith(m + ".")}
                assert known, (
                    f"{where}: data code may import only {sorted(DATA_MAY_IMPORT_FROM_MODEL)} of the model package"
                )
            assert module.split(".")[0] not in APPLICATIONS, f"{where}: data code never imports the applications"


def test_one_top_k_search_that_the_pipeline_index_and_metrics_import():
    code = [
        path
        for folder in ("modeling_mqirtn", "processing", "mqirtn_app", "mqirtn_train", "demo")
        for path in (REPO_ROOT / folder).rglob("*.py")
    ]
    searching = sorted(str(path.relative_to(REPO_ROOT)) for path in code if ".topk(" in path.read_text())
    assert searching == ["modeling_mqirtn/search_mqirtn.py"]
    for user in ("modeling_mqirtn/pipeline_mqirtn.py", "mqirtn_app/index.py", "processing/data/metrics.py"):
        modules = imported_modules(REPO_ROOT / user)
        assert "modeling_mqirtn.search_mqirtn.exact_search" in modules, f"{user} does not import the search"


def test_importing_the_dataset_registry_imports_no_torch():
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import processing.data.registry"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in completed.stderr.splitlines() if "|" in line}
    assert "processing" in imported
    assert not {"torch", "transformers", "datasets", "modeling_mqirtn", "PIL", "numpy"} & imported
