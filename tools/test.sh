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
