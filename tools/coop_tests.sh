#!/usr/bin/env bash
# The tensor-core kernels (wgpu's cooperative matrices) on the CPU: Mesa 26's lavapipe, from
# Debian trixie-backports, offers 8x8x8 f16 products into f32 on subgroups of 8, of which
# mma.wgsl builds its fragments. Its libraries need trixie's glibc, so they are unpacked into a
# private folder (nothing is installed) and the test executables run under trixie's dynamic
# loader with them. MAMBA_MIXER_EXPECT_COOP=1 makes the suites fail if the full-featured device
# does not use cooperative matrices. tools/test.sh runs this after the main suites.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${MAMBA_MIXER_SKIP_COOP:-0}" = 1 ]; then
    echo "MAMBA_MIXER_SKIP_COOP=1: the tensor-core kernels are NOT tested in this run" >&2
    exit 0
fi
if [ "$(dpkg --print-architecture)" != amd64 ]; then
    echo "tools/coop_tests.sh fetches Debian's amd64 packages; this machine is $(dpkg --print-architecture)" >&2
    exit 1
fi
root="$PWD/target/mesa26"
lib="$root/usr/lib/x86_64-linux-gnu"
if [ ! -e "$lib/libvulkan_lvp.so" ]; then
    echo "fetching Mesa's lavapipe from Debian trixie-backports (into target/mesa26)" >&2
    apt_dir=$(mktemp -d)
    trap 'rm -rf "$apt_dir"' EXIT
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/debs/partial" "$apt_dir/cache"
    touch "$apt_dir/status"
    printf 'deb http://deb.debian.org/debian trixie main\ndeb http://deb.debian.org/debian trixie-backports main\n' \
        >"$apt_dir/sources.list"
    # Apt's own state, caches and pins stay out of it: only this folder is read and written.
    o=(-oDir::State::Lists="$apt_dir/lists" -oDir::Etc::SourceList="$apt_dir/sources.list"
        -oDir::Etc::SourceParts=/dev/null -oDir::Cache="$apt_dir/cache"
        -oDir::Cache::archives="$apt_dir/debs" -oDir::State::status="$apt_dir/status"
        -oDir::Etc::Preferences=/dev/null -oDir::Etc::PreferencesParts=/dev/null
        -oAPT::Sandbox::User=root)
    apt-get "${o[@]}" update -qq
    apt-get "${o[@]}" install -y -qq --download-only mesa-vulkan-drivers/trixie-backports libvulkan1 >/dev/null
    rm -rf "$root.part" && mkdir -p "$root.part"
    for f in "$apt_dir"/debs/*.deb; do dpkg -x "$f" "$root.part"; done
    rm -rf "$root" && mv "$root.part" "$root"
fi
icd="$root/lvp_icd.json"
python3 -c 'import json, sys; json.dump({"file_format_version": "1.0.1",
    "ICD": {"library_path": sys.argv[1], "api_version": "1.4.0"}}, open(sys.argv[2], "w"))' \
    "$lib/libvulkan_lvp.so" "$icd"

# The executables of the suites that compare every op and path with the CPU backend (built first
# on their own, so that a build error shows).
cargo test --locked --no-run
mapfile -t exes < <(cargo test --locked --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and \
            m["target"]["name"] in ("mamba_mixer", "ops", "engine", "conformance"):
        print(m["executable"])')
if [ "${#exes[@]}" -ne 4 ]; then
    echo "expected the executables of the lib, ops, engine and conformance tests, got: ${exes[*]}" >&2
    exit 1
fi
for exe in "${exes[@]}"; do
    echo "== $(basename "$exe") on Mesa 26's lavapipe, cooperative matrices on ==" >&2
    VK_ICD_FILENAMES="$icd" MAMBA_MIXER_EXPECT_COOP=1 \
        "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$exe"
done
