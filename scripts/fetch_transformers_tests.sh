#!/usr/bin/env bash
# Unpacks the test modules of the installed transformers release into .cache/transformers-tests/<version>/ for
# tests/test_transformers_common.py (transformers' own ModelTesterMixin, ConfigTester and ProcessorTesterMixin). The
# wheel has no tests/; the release's source archive on PyPI carries them. Pinned to the installed version, fetched
# once; with the folder in place nothing is downloaded again (offline afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
version=$("$PY" -c "import transformers; print(transformers.__version__)")
dest=".cache/transformers-tests/$version"
if [ -f "$dest/COMPLETE" ]; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "Fetching the test modules of transformers $version (its source archive, from PyPI)..."
"$PY" -m pip download --quiet --no-deps --no-binary :all: "transformers==$version" -d "$work" >"$work/pip.log" 2>&1 || {
    tail -n 20 "$work/pip.log" >&2
    echo "error: could not download the source archive of transformers $version" >&2
    exit 1
}
"$PY" - "$work" "$version" <<'PYTHON'
import sys, tarfile
from pathlib import Path

work, version = Path(sys.argv[1]), sys.argv[2]
archive = work / f"transformers-{version}.tar.gz"
target = work / "unpacked" / "transformers_release_tests"
target.mkdir(parents=True)
prefix = f"transformers-{version}/tests/"
with tarfile.open(archive) as tar:
    members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".py")]
    members = [m for m in members if "/" not in m.name[len(prefix):]]  # the archive's tests/ is flat
    if not any(m.name.endswith("/test_modeling_common.py") for m in members):
        sys.exit(f"error: {archive.name} has no tests/test_modeling_common.py")
    for member in members:
        (target / Path(member.name).name).write_bytes(tar.extractfile(member).read())
(target / "__init__.py").write_text("")
print(f"unpacked {len(members)} test modules of transformers {version}")
PYTHON
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$work/unpacked" "$dest"
touch "$dest/COMPLETE"
