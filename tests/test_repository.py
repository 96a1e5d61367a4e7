"""The house rules a reader can check with `git grep`: no `sys.path` edits (the editable install and pytest's
`pythonpath` make the packages importable), `train.py` is a script nobody imports, the test helpers live in
`tests/utils.py` and no test module imports another."""

import ast
import subprocess

from utils import REPO_ROOT


def tracked_python_files() -> list:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    files = [REPO_ROOT / name for name in listed.stdout.split()]
    assert len(files) > 50 and REPO_ROOT / "train.py" in files
    return [path for path in files if path.is_file()]


def imports_of(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
    return found


def test_no_sys_path_edits():
    edits = []
    for path in tracked_python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t.value for t in targets if isinstance(t, ast.Subscript)), None)
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", "") == "sys":
                edits.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not edits, f"sys.path is edited in {edits}"


def test_nobody_imports_train_py():
    importers = [str(path.relative_to(REPO_ROOT)) for path in tracked_python_files() if "train" in imports_of(path)]
    assert not importers, f"{importers} import train.py; import the mqirtn_train package instead"


def test_tests_share_helpers_through_utils_and_never_import_each_other():
    test_modules = {path.stem for path in (REPO_ROOT / "tests").glob("test_*.py")}
    for path in (REPO_ROOT / "tests").glob("*.py"):
        imported = {name.split(".")[0] for name in imports_of(path)}
        assert "conftest" not in imported, f"{path.name}: import helpers from utils, not conftest"
        assert not imported & test_modules, f"{path.name} imports the test module(s) {sorted(imported & test_modules)}"
