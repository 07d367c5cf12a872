#!/usr/bin/env bash
# Builds the browser demo: the web crate as a WebAssembly module with its JS bindings in web/pkg/.
# Needs the wasm32-unknown-unknown target and wasm-bindgen-cli at the version of the wasm-bindgen
# crate in web/Cargo.lock (tools/test.sh installs both). Then: python3 web/serve.py
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --lib --target wasm32-unknown-unknown
rm -rf pkg
wasm-bindgen --target web --no-typescript --out-dir pkg \
    "${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/release/mamba_mixer_web.wasm"
echo "built web/pkg ($(du -sh pkg | cut -f1)); serve it with: python3 web/serve.py"
