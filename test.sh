#!/usr/bin/env bash
# Builds spear with its tests and runs them all (CPU; GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
scripts/build.sh
cd build && ctest --output-on-failure -j"$(nproc)" --timeout 1500
