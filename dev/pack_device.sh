#!/bin/bash
# Packs what dev/run_load_bench.sh needs into build-bin/ (git-ignored; name it in `carry`):
# the stripped spear and spear_cuda_tests of build/, the binary from before a change as
# spear-before (optional first argument), the host libraries the device image may lack, and
# data/: models/mixlm-19m (without hidden states), wiki.{test,valid}.tokens and wiki.test.raw; then xz into
# build-pack/bin.tar.xz (the device command starts with `tar xJf build-pack/bin.tar.xz`).
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:-}
rm -rf build-bin && mkdir -p build-bin/lib build-bin/data
cp build/spear build/tests/spear_cuda_tests build-bin/
[ -x build/bench/bench_w4a16 ] && cp build/bench/bench_w4a16 build-bin/
[ -n "$BEFORE" ] && cp "$BEFORE" build-bin/spear-before
strip build-bin/spear* 2>/dev/null || true
for l in $(ldd build/spear build/tests/spear_cuda_tests | awk '/=>/{print $3}' | sort -u |
           grep -E "httplib|brotli|openblas|gfortran|quadmath|pcre2"); do cp -L "$l" build-bin/lib/; done
mkdir -p build-bin/data/models/mixlm-19m build-pack
cp ../shared/models/mixlm-19m/{config.json,tokenizer.json,*.safetensors.index.json,model-*.safetensors,reference.json} build-bin/data/models/mixlm-19m/
cp ../shared/data/wikitext-2/wiki.{test,valid}.tokens ../shared/data/wikitext-2-raw/wiki.test.raw build-bin/data/
tar cJf build-pack/bin.tar.xz build-bin
du -sh build-bin build-pack/bin.tar.xz
