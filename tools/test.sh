#!/usr/bin/env bash
# The test command of the README: installs what the tests need, then runs every test.
# CI (.ci/run) calls exactly this on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

# Style gates first: they fail fast and cost little.
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --check
else
    echo "note: rustfmt is not installed; skipping the format check" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --locked --all-targets -- -D warnings
else
    echo "note: clippy is not installed; skipping the lint check" >&2
fi

# The wgpu tests run the WGSL shaders for real on the CPU, through Mesa's lavapipe (Vulkan).
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    echo "installing Mesa's lavapipe (mesa-vulkan-drivers) for the wgpu tests" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
# Mesa looks for a runtime folder; give it one so that it does not complain on every start.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

cargo test --locked
# The tensor-core kernels too, on a newer lavapipe that has cooperative matrices.
tools/coop_tests.sh

# The browser build (web/, its own cargo workspace): the WebGPU backend in headless Chromium
# (Debian's package; WebGPU on its built-in SwiftShader adapter, loopback only) against the CPU
# backend in the same wasm module, then the demo page. Installs the wasm32 target, Chromium and
# its WebDriver, and wasm-bindgen-cli at the version of wasm-bindgen in web/Cargo.lock.
wasm_start=$SECONDS
echo "== wasm32-unknown-unknown: the mixer on WebGPU in headless Chromium ==" >&2
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "installing Chromium and chromedriver for the browser test" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# Resolve web/'s dependencies first (a dependency added to the main crate lands in web/Cargo.lock
# here), so that the CLI matches the wasm-bindgen crate exactly.
(cd web && cargo metadata --format-version 1 >/dev/null)
wb_version=$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' web/Cargo.lock)
if [ "$(wasm-bindgen-test-runner --version 2>/dev/null)" != "wasm-bindgen-test-runner $wb_version" ]; then
    echo "installing wasm-bindgen-cli $wb_version" >&2
    # Its lockfile first; unlocked (newest compatible dependencies) when the registry lacks one of
    # the locked versions.
    cargo install --quiet --force wasm-bindgen-cli --version "$wb_version" --locked ||
        cargo install --quiet --force wasm-bindgen-cli --version "$wb_version"
fi
(
    cd web
    cargo fmt --check
    cargo clippy --release --target wasm32-unknown-unknown --all-targets -- -D warnings
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
    CHROMEDRIVER="$(command -v chromedriver)"
    export CHROMEDRIVER
    # Chromium's flags (--headless=new --no-sandbox --enable-unsafe-webgpu ...) are in here.
    export WASM_BINDGEN_TEST_WEBDRIVER_JSON="$PWD/webdriver.json"
    export WASM_BINDGEN_TEST_TIMEOUT=900
    cargo test --release --target wasm32-unknown-unknown --test browser -- --nocapture
    ./build.sh
    python3 serve.py --check full decode
)
echo "wasm32 part: $((SECONDS - wasm_start)) s" >&2
