#!/usr/bin/env bash
# The README's main job: install the package, then run base model -> SFT -> RM -> PPO on the
# simulated world (about 5 minutes on 2 CPU cores). Extra flags go to the pipeline module.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e .
source scripts/allocator.sh
python -m experiments.pipeline "$@"
