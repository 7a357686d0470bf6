# Shared by scripts/test and scripts/demo: create .venv and install wsconvert into it, once per pyproject change.
# WSCONVERT_EXTRA picks the extra (default: test); WSCONVERT_THIRDPARTY=1 (what .ci/run sets) adds the
# thirdparty extra (tests/thirdparty/) with torch and torchvision pinned to the versions already installed,
# so that no third-party library replaces the local torch build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRA="${WSCONVERT_EXTRA:-test}"
THIRDPARTY="${WSCONVERT_THIRDPARTY:-0}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.wsconvert-installed-$EXTRA-thirdparty$THIRDPARTY"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRA]" >&2
  if [ "$THIRDPARTY" = 1 ]; then
    CONSTRAINTS="$VENV/.wsconvert-constraints.txt"
    "$VENV/bin/python" - > "$CONSTRAINTS" <<'PY'
from importlib.metadata import version
print(f"torch=={version('torch')}\ntorchvision=={version('torchvision')}")
PY
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRA,thirdparty]" -c "$CONSTRAINTS" >&2
  fi
  echo "$WANT" > "$STAMP"
fi
