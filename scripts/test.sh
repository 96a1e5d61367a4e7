#!/usr/bin/env bash
# The test command: installs into .venv, then runs the fast tests (-m "not slow") on their own, then the slow ones
# (subprocess runs of train.py, servers, the browser), then ruff (lint and format). Tiny random models, CPU, offline.
# With arguments, only `pytest` with them (e.g. `bash scripts/test.sh tests/test_train.py -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The demo's browser test drives the system Chromium through Playwright (Playwright's own browser downloads are not
# used). A fresh machine gets Debian's chromium here when we are root; otherwise that test fails and says how to install it.
if [ -z "${MQIRTN_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing chromium (apt-get) for the demo's browser test..."
        if ! (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium) \
            >/tmp/mqirtn-apt-chromium.log 2>&1; then
            tail -n 20 /tmp/mqirtn-apt-chromium.log >&2
            echo "warning: could not install chromium; the browser test will fail" >&2
        fi
    else
        echo "warning: no chromium (apt-get install -y chromium, or set MQIRTN_CHROMIUM); the browser test will fail" >&2
    fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# transformers' common testers must run here (a missing copy fails the run instead of skipping it).
export MQIRTN_REQUIRE_TRANSFORMERS_TESTS=1
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest tests -m "not slow"
# The slow tests start servers (the demo, Milvus): they run in a network namespace of their own whose one interface is
# the loopback, so nothing they start can listen beyond 127.0.0.1 (Milvus 2.3.5's gRPC components listen on every
# interface). Without `unshare` (not root), the Milvus server tests skip and say why.
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
    && unshare --net true 2>/dev/null; then
    unshare --net sh -c 'ip link set lo up && MQIRTN_REQUIRE_MILVUS_SERVER=1 exec .venv/bin/python -m pytest tests -m slow'
else
    echo "warning: no network namespace (root, unshare and ip needed); the Milvus server tests will skip" >&2
    .venv/bin/python -m pytest tests -m slow
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
