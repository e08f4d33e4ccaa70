#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is missing, build, and run
# spear on the model shipped in the repository (stories260K, TinyStories text).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
scripts/build.sh
model=models/stories260K-hf
data=data/tinystories/tinystories_val.txt
echo "== spear info"
build/spear info $model
echo "== spear generate (greedy)"
build/spear generate --model $model --prompt "Once upon a time" --max-tokens 48
echo "== spear ppl (fp32, 512-token windows; reference: 5.04816)"
build/spear ppl --model $model --data $data --ctx 512
