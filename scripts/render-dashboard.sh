#!/usr/bin/env bash
# Renders the main panels of the Grafana dashboard (deploy/helm/imdsgate/files/grafana-dashboard.json)
# to a PNG from a Prometheus, with matplotlib from a virtualenv kept outside the clone:
#
#   scripts/render-dashboard.sh --prometheus http://127.0.0.1:9090 --out docs/dashboard.png [--range 15m]
#       [--end UNIX_TIME] [--panels "Agent requests by route,Cache hit ratio"]
#   scripts/render-dashboard.sh --check --prometheus URL     every panel's queries, nothing drawn
#
# Every argument goes to render-dashboard.py (see its --help). The first run creates the virtualenv
# and installs the pinned matplotlib from PyPI; later runs only check a stamp file.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

MATPLOTLIB_VERSION=3.11.2
python=${PYTHON:-python3}
venv=${XDG_CACHE_HOME:-$HOME/.cache}/imdsgate/render-venv
stamp="$venv/.imdsgate-matplotlib-$MATPLOTLIB_VERSION"

if [ ! -e "$stamp" ] || [ ! -x "$venv/bin/python" ]; then
  command -v "$python" >/dev/null || { echo "render-dashboard: '$python' is not on PATH" >&2; exit 1; }
  echo "render-dashboard: installing matplotlib $MATPLOTLIB_VERSION into $venv (first run only)" >&2
  mkdir -p "$(dirname "$venv")"
  # --clear: a venv left by an interrupted run or an older pin starts over.
  "$python" -m venv --clear "$venv" >&2 ||
    { echo "render-dashboard: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
    "matplotlib==$MATPLOTLIB_VERSION" >&2 ||
    { echo "render-dashboard: installing matplotlib $MATPLOTLIB_VERSION from PyPI failed" >&2; exit 1; }
  touch "$stamp"
fi
exec "$venv/bin/python" "$here/render-dashboard.py" "$@"
