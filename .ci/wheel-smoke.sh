#!/usr/bin/env bash
# The installed wheel, not the checkout: build the wheel from a clean copy of the sources, install it
# (no dependencies: they are this environment's) into a fresh venv that sees this environment's
# packages through a .pth file, and from a folder outside the checkout run `fireflow --help`, an
# edit, `bench pie` and `eval pie` on the demo benchmark set the wheel carries.
# Usage: .ci/wheel-smoke.sh [PYTHON]  (default: $PYTHON or python3; the one with fireflow's dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

mkdir "$tmp/src"
# A copy, so that no stale build/ or egg-info of the checkout reaches the wheel.
tar -c --exclude=__pycache__ --exclude='*.egg-info' --exclude=build pyproject.toml README.md fireflow research \
    | tar -x -C "$tmp/src"
# Offline with this environment's setuptools when it is new enough (pyproject asks >= 77), else isolated.
isolation="$("$PY" -c 'import setuptools as s; print("--no-build-isolation" * (int(s.__version__.split(".")[0]) >= 77))' \
    2>/dev/null || true)"
"$PY" -m pip wheel -q --no-deps $isolation -w "$tmp/dist" "$tmp/src"
wheel="$(ls "$tmp"/dist/fireflow-*.whl)"

# A venv of its own: the wheel goes into its site-packages; the dependencies come from $PY's through a
# plain path line (no `import site` line: an editable fireflow there must stay invisible).
"$PY" -m venv --without-pip "$tmp/venv"
deps="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$deps" > "$site/_deps.pth"
"$tmp/venv/bin/python" -m pip install -q --no-deps --no-index --ignore-installed "$wheel"

mkdir "$tmp/work" && cd "$tmp/work"
export HF_HUB_OFFLINE=1
ff="$tmp/venv/bin/fireflow"
"$tmp/venv/bin/python" - "$site" <<'PY'
import importlib.util, sys
import fireflow
assert fireflow.__file__.startswith(sys.argv[1]), f"fireflow imported from {fireflow.__file__}, not the wheel"
assert importlib.util.find_spec("research") is None, "research/ is not installed"
print("fireflow from", fireflow.__file__)
PY
"$ff" --help >/dev/null
image="$("$tmp/venv/bin/python" -c 'from fireflow.bench.pie import SCENES_PIE as s; print(sorted(s.rglob("*.png"))[0])')"
"$ff" edit "$image" --model scenes -s "a cat face on a white background" -t "a dog face on a white background" -o edit.png -q
test -s edit.png
"$ff" bench pie --data scenes --model scenes --types 6 --out pie -q
"$ff" eval pie --data scenes --types 6 --edits pie --skip structure clip lpips -q
test -s pie/eval_summary.json
echo "wheel smoke test passed: $(basename "$wheel")"
