#!/usr/bin/env bash
# Create bench/compare/.venv (if missing) and install the pinned Python
# packages from requirements.txt.  Idempotent: does nothing when the venv
# already matches requirements.txt.  Quiet unless something fails.
#
#   PYTHON=python3.11 bench/compare/setup.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$venv/bin/python" -m pip install --quiet --no-input -r "$req"; then
    echo "setup.sh: pip install -r $req failed (see above)" >&2
    exit 1
fi
"$venv/bin/python" - <<'PY'
import sys, celery, dask, distributed, kombu, ray, redis
print(f"bench venv: dask {dask.__version__}, distributed {distributed.__version__}, "
      f"celery {celery.__version__}, kombu {kombu.__version__}, redis-py {redis.__version__}, "
      f"ray {ray.__version__}",
      file=sys.stderr)
PY
echo "$want" > "$stamp"
