# Sourced by the launch scripts: sets PY to the Python that runs the project and says which it is: $PYTHON if set,
# else the .venv beside this checkout (the README's setup), else the active python3. The checkout goes on PYTHONPATH,
# so the scripts also run from a copy that was never pip-installed.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$_root/.venv/bin/python" ]; then
  PY=$_root/.venv/bin/python
else
  PY=$(command -v python3 || command -v python || true)
fi
if [ -z "$PY" ] || ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "error: no Python with torch (tried '${PY:-nothing}'): run the README's setup, which makes $_root/.venv, or set PYTHON=/path/to/python" >&2
  exit 1
fi
echo "$(basename "$0"): using $PY ($("$PY" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")'))" >&2
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
