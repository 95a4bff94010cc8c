#!/usr/bin/env bash
# One-command environment for HARNet: a virtual environment with torch/torchvision,
# Detectron2 (existing > source at a pinned commit > PyPI fallback), the test tools and
# harnet itself in editable mode. Idempotent: a second run only checks (seconds).
#
#   tools/setup_env.sh            # venv in $HARNET_VENV, default <repo>/.venv
#   HARNET_VENV=~/envs/d2 tools/setup_env.sh   # reuse/extend an existing environment
#   HARNET_D2_MODE=fallback tools/setup_env.sh # force a Detectron2 install mode
#   HARNET_D2_SOURCE=path/to/detectron2[.tar.gz] HARNET_VENV=... tools/setup_env.sh
#                                              # compile Detectron2 from a local source
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above is the usage
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit 0
fi
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HARNET_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.harnet-setup-stamp"
start=$(date +%s)

D2_SOURCE="${HARNET_D2_SOURCE:-}"
if [[ -n "$D2_SOURCE" && ! -e "$D2_SOURCE" ]]; then
  echo "[setup] HARNET_D2_SOURCE=$D2_SOURCE: no such file or directory" >&2
  exit 2
fi
# Everything that decides what gets installed; a change re-runs the install. The clone's
# path counts: harnet is installed in editable mode, pointing at one clone.
want=$( { cat "$ROOT/requirements/base.txt" "$ROOT/setup.cfg" "$ROOT/pyproject.toml" \
  "$ROOT/tools/install_detectron2.py" "$ROOT/projects/HARNet/harnet/d2_compat/info.py" \
  "$ROOT/projects/HARNet/harnet/d2_compat/_C_fallback.py"
  echo "root=$ROOT mode=${HARNET_D2_MODE:-auto} source=$D2_SOURCE"
  if [[ -n "$D2_SOURCE" ]]; then stat -c "%s %Y" "$D2_SOURCE"; fi; } | sha256sum | cut -d' ' -f1)

MODULES="torch torchvision detectron2 detectron2._C harnet pycocotools cv2 pytest hypothesis"
check() {  # really import everything (after an install)
  "$PY" -c "import importlib; [importlib.import_module(m) for m in '$MODULES'.split()]"
}
quick_check() {  # locate everything without importing (the idempotent fast path)
  "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in '$MODULES'.split()))" 2>/dev/null
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && quick_check; then
  echo "[setup] environment $VENV is up to date ($(( $(date +%s) - start ))s)"
  exit 0
fi

echo "[setup] preparing $VENV"
[[ -x "$PY" ]] || python3 -m venv "$VENV"
# uv installs the multi-GB torch wheels much faster than pip.
"$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip -q
[[ -x "$VENV/bin/uv" ]] || "$PY" -m pip install -q "uv>=0.4"
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
# uv ignores pip's config; use the system CA bundle like pip does here.
export UV_SYSTEM_CERTS=1
uv pip install --python "$PY" -r "$ROOT/requirements/base.txt"
HARNET_D2_MODE="${HARNET_D2_MODE:-auto}"
"$PY" "$ROOT/tools/install_detectron2.py" --mode "$HARNET_D2_MODE"
uv pip install --python "$PY" --no-deps -e "$ROOT"
check || { echo "[setup] environment check failed" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start ))s; environment size $(du -sh "$VENV" | cut -f1)"
