#!/usr/bin/env bash
# Create .venv beside this repository and install lifelong into it (CPU set-up).
# Usage: bash deploy/bootstrap.sh [test]   -- "test" also installs the test extras.
# Idempotent: a second call only re-checks what is installed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv" >&2
  "$python" -m venv .venv
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
stamp=".venv/.lifelong-installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ deploy/constraints-cpu.txt -nt "$stamp" ]; then
  echo "[bootstrap] installing torch 2.13.0 (CPU) and lifelong${extras} into .venv" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check -c deploy/constraints-cpu.txt "torch==2.13.0"
  .venv/bin/pip install --quiet --disable-pip-version-check -c deploy/constraints-cpu.txt -e ".${extras}"
  touch "$stamp"
fi
