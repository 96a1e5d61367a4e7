"""The house rules a reader can check with `git grep`: no `sys.path` edits (the editable install and pytest's
`pythonpath` make the packages importable), `train.py` is a script nobody imports, the test helpers live in
`tests/utils.py` and no test module imports another, `benchmarks/results/` holds exactly the records the documents
cite, and nothing refers to working notes, issue numbers or machine paths."""

import ast
import fnmatch
import re
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
            if (
                isinstance(target, ast.Attribute)
                and target.attr == "path"
                and getattr(target.value, "id", "") == "sys"
            ):
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


# ------------------------------------------------------------------------------------------------ documents
RESULTS = REPO_ROOT / "benchmarks" / "results"
DOCUMENTS = [
    REPO_ROOT / "README.md",
    REPO_ROOT / "benchmarks" / "README.md",
    *sorted((REPO_ROOT / "docs").glob("*.md")),
]
FILE_NAME = re.compile(r"[\w{},*.\-/]+\.(?:json|md|png|csv|txt|jsonl|log)")


def _expand_braces(token: str) -> list[str]:
    """`a_{1,2}.json` -> [`a_1.json`, `a_2.json`] (the shell's brace form the documents use)."""
    match = re.search(r"\{([^{}]*)\}", token)
    if match is None:
        return [token]
    return [
        name
        for part in match.group(1).split(",")
        for name in _expand_braces(token[: match.start()] + part + token[match.end() :])
    ]


def cited_results(text: str) -> tuple[set[str], list[str]]:
    """(result files a text names, its `results/...` paths that name no file). A bare name counts (the benchmark
    tables name their JSON files without the folder); a path into `results/` must exist; `*` matches as in a shell."""
    names = sorted(path.name for path in RESULTS.iterdir() if path.is_file())
    cited, dangling = set(), []
    for token in FILE_NAME.findall(text):
        for name in _expand_braces(token):
            matches = fnmatch.filter(names, name.rsplit("/", 1)[-1])
            cited.update(matches)
            if "results/" in name and not matches:
                dangling.append(name)
    return cited, dangling


def test_every_results_file_is_cited_and_every_citation_exists():
    cited, dangling = set(), []
    for document in DOCUMENTS:
        names, missing = cited_results(document.read_text())
        cited |= names
        dangling += [f"{document.relative_to(REPO_ROOT)}: {name}" for name in missing]
    for name in sorted(cited):  # a cited record may show a picture of its own
        if name.endswith(".md"):
            cited |= cited_results((RESULTS / name).read_text())[0]
    uncited = sorted(path.name for path in RESULTS.iterdir() if path.is_file() and path.name not in cited)
    assert not uncited, f"benchmarks/results/ files no document cites: {uncited}"
    assert not dangling, f"citations of files benchmarks/results/ does not have: {dangling}"


def test_no_working_notes_and_no_references_to_the_history_of_the_writing():
    assert not (REPO_ROOT / "notes").exists()
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    texts = [
        REPO_ROOT / name for name in listed if name.endswith((".py", ".md", ".sh", ".toml", ".cfg", ".txt", ".yaml"))
    ]
    # \x20 and \x2f keep this line from matching itself.
    pattern = re.compile(
        r"issue\x20[0-9]|DESIGN\x20[0-9]|(previous|this|second|last)\x20session|\x2fwork\x2f", re.IGNORECASE
    )
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in texts
        if path.is_file()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, f"references a reader cannot follow: {found}"
