#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the peers it needs (Debian packages when
# root, Python packages with pip), builds the .pyz, runs pytest. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(nginx-light docker-registry skopeo umoci groff-base tinyproxy)
missing=()
for d in "${debs[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: NOT ROOT, cannot install ${missing[*]}: their tests will be skipped loudly" >&2
  fi
fi
# Debian starts nginx and docker-registry as services on install; the tests run their own.
for svc in nginx docker-registry tinyproxy; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
done

python3 -m pip install -q --disable-pip-version-check \
  "urllib3==2.6.3" "platformdirs==4.4.0" \
  pytest pytest-cov pytest-xdist huggingface_hub hypothesis cryptography vermin \
  "ruff==0.17.6" "mypy==2.4.1"
# Lint and types first: either finding anything fails the run (pinned: new releases add rules).
python3 -m ruff check nekko_sm tests bench
python3 -m ruff format --check nekko_sm tests bench
python3 -m mypy nekko_sm
python3 build_zipapp.py
# hypothesis builds its Unicode tables on first use and keeps them in .hypothesis/: on a
# fresh tree, under coverage, that was 16 s of the first fuzz test; here, without, 5 s.
python3 -W ignore -c "from hypothesis import strategies as st; st.text().example()"
# Two workers (pytest-xdist, a test-only tool): the suite must stay under 10 minutes on 2
# cores, and one process alone leaves a core idle while its tests wait on peers. Each worker
# starts its own peers on free ports; a file is never split (loadfile), the longest go first
# (conftest.py); pytest-cov combines the workers' coverage. "-n 0" after this runs serially.
# pytest-benchmark, where installed, would turn itself off under xdist with a warning, which
# the suite's filterwarnings=error makes an error: no test here uses it.
exec python3 -m pytest -p no:cacheprovider -p no:benchmark --cov=nekko_sm --cov-report=term \
  -n 2 --dist loadfile --no-loadscope-reorder "$@"
