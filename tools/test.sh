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

cargo test --locked
