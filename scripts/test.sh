#!/usr/bin/env bash
# The README's test command: install the package with its test extra, then run the CPU test
# suite (tests marked `slow` are excluded; run them with `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e ".[test]"
source scripts/allocator.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
python -m pytest -m "not slow" "$@"
