#!/usr/bin/env bash
# Install the newest releases moeprof's ranges allow (tested upper bounds widened to the next major version) into
# a separate venv, run the test suite there, and print which packages moved and which families or tests broke.
#
#   scripts/check-latest.sh                  # the whole suite (the README's test command, ~10 min on 2 cores)
#   scripts/check-latest.sh tests/test_families.py   # only these pytest arguments
#   scripts/check-latest.sh --write-lock     # on a green run, move constraints.txt to what was tested
#
# The venv is .venv-latest (VENV=... to change it); the report lands in outputs/check-latest/. How the lock moves
# forward: docs/environment.md.
set -euo pipefail
cd "$(dirname "$0")/.."
write_lock=0
if [[ "${1:-}" == "--write-lock" ]]; then write_lock=1; shift; fi
if [[ $write_lock -eq 1 && $# -gt 0 ]]; then
  echo "error: --write-lock moves the lock only after the whole suite passed; drop the pytest arguments ($*)" >&2
  exit 2
fi
venv="${VENV:-.venv-latest}"
report=outputs/check-latest
mkdir -p "$report"

rm -rf "$venv"
python3 -m venv "$venv"
python3 scripts/lockfile.py relaxed-requirements --extras triton,test > "$report/requirements.txt"
# torch stays the local CPU build (see docs/environment.md); everything else: the newest release allowed
quiet() { grep -v "^WARNING: Location" >&2 || true; }  # this machine's pip config lists absent local indexes
"$venv/bin/pip" install -q --upgrade torch==2.13.0 -r "$report/requirements.txt" 2> >(quiet)
"$venv/bin/pip" install -q --no-deps -e . 2> >(quiet)
"$venv/bin/pip" freeze --all > "$report/freeze.txt"

echo "== packages that moved against constraints.txt"
python3 scripts/lockfile.py diff constraints.txt "$report/freeze.txt"

echo "== test suite on the newest releases"
set +e
"$venv/bin/python" -m pytest -n 2 -q -p no:cacheprovider --junitxml="$report/junit.xml" "$@" > "$report/pytest.log" 2>&1
pytest_rc=$?
set -e
tail -n 3 "$report/pytest.log"
if [[ ! -s "$report/junit.xml" ]]; then
  echo "error: pytest wrote no report (exit $pytest_rc); see $report/pytest.log" >&2
  exit 2
fi
set +e
python3 scripts/lockfile.py summary "$report/junit.xml"
broke=$?
set -e
if [[ $broke -ne 0 || $pytest_rc -ne 0 ]]; then
  echo "the newest releases break moeprof: fix the families/tests above before moving the lock (docs/environment.md)"
  exit 1
fi
if [[ $write_lock -eq 1 ]]; then
  python3 scripts/lockfile.py write-lock "$report/freeze.txt" constraints.txt
  tv=$("$venv/bin/python" -c "import transformers as t; v=t.__version__.split('.'); print(f'{v[0]}.{int(v[1]) + 1}')")
  python3 scripts/lockfile.py bump-upper pyproject.toml transformers "$tv"
  echo "constraints.txt now pins what passed; pyproject.toml allows transformers <$tv. Commit both, with the"
  echo "family table regenerated (python tests/moe_families.py) and the full suite green in CI."
else
  echo "green: rerun with --write-lock to move constraints.txt to these versions"
fi
