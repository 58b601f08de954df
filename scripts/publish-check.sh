#!/usr/bin/env bash
# Checks that every crate meant for crates.io can be published, without
# uploading anything:
#
# 1. each published crate carries the root's license texts (cargo package
#    takes only files under the crate's directory, so each has copies);
# 2. `cargo publish --workspace --dry-run --no-verify`: packages every crate
#    whose manifest does not say `publish = false` (in-workspace dependencies
#    resolve through cargo's local overlay of the packages it just made) and
#    runs the registry's checks of each manifest;
# 3. every package is then type-checked on its own from the sources in its
#    .crate file, against the other packaged crates: a file left out of the
#    package or a dependency feature that only another workspace member
#    turned on fails here.
#
# Step 3 replaces cargo's own verification, which builds each package in
# full (code generation and linking, with the default dev profile's full
# debug info, dependencies compiled again per feature set): 4 min 3 s for
# the first 3 of the 8 crates (proto, runtime, scheduler) on the 2-core CI
# machine. `cargo check` of each package from its packaged sources finds
# the same packaging mistakes without the code generation: about a minute
# for all 8 once clippy has checked the dependencies.
#
#   bash scripts/publish-check.sh
#   PUBLISH_CHECK_ALLOW_DIRTY=1 bash scripts/publish-check.sh   # uncommitted changes too
#
# Needs the network for the crates.io index (step 2); step 3 is offline and
# reuses this workspace's Cargo.lock and target directory.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

fail() {
    echo "publish-check: $*" >&2
    exit 1
}

target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
dirty=()
[[ -z ${PUBLISH_CHECK_ALLOW_DIRTY:-} ]] || dirty=(--allow-dirty)

# The packages cargo publishes, with their directories: every workspace
# member whose `publish` is not false.
mapfile -t packages < <(
    cargo metadata --format-version 1 --no-deps --locked |
        python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["publish"] != []:
        print(p["name"], p["version"], os.path.dirname(p["manifest_path"]))
'
)
[[ ${#packages[@]} -gt 0 ]] || fail "no publishable package found"

echo "publish-check: license texts in each published crate"
for line in "${packages[@]}"; do
    read -r name _ dir <<<"$line"
    for license in LICENSE-MIT LICENSE-APACHE; do
        cmp -s "$license" "$dir/$license" ||
            fail "$name: $dir/$license is missing or differs from ./$license (cp $license $dir/)"
    done
done

echo "publish-check: cargo publish --workspace --dry-run --no-verify --locked"
cargo publish --workspace --dry-run --no-verify --locked "${dirty[@]}"

# The same packages again, written where cargo documents them
# (target/package/<name>-<version>.crate; publish keeps its own in a
# temporary place). `cargo package --workspace` would not skip the
# unpublished members, so they are named.
selected=()
for line in "${packages[@]}"; do
    read -r name _ <<<"$line"
    selected+=(-p "$name")
done
echo "publish-check: cargo package ${selected[*]} --no-verify --locked"
cargo package "${selected[@]}" --no-verify --locked --quiet "${dirty[@]}"

# A scratch workspace of the unpacked .crate files, each packaged manifest
# as published; their dependencies on one another go to the unpacked
# copies through [patch.crates-io].
scratch="$target_dir/publish-check"
rm -rf "$scratch"
mkdir -p "$scratch"
members=()
patches=()
for line in "${packages[@]}"; do
    read -r name version _ <<<"$line"
    crate="$target_dir/package/$name-$version.crate"
    [[ -f $crate ]] || fail "$crate was not made"
    tar -xzf "$crate" -C "$scratch"
    members+=("\"$name-$version\"")
    patches+=("$name = { path = \"$name-$version\" }")
done
{
    echo "[workspace]"
    echo "members = [$(IFS=,; echo "${members[*]}")]"
    echo 'resolver = "2"'
    echo
    echo "[patch.crates-io]"
    printf '%s\n' "${patches[@]}"
    echo
    # This workspace's dev profile, so that dependencies checked before (by
    # clippy) are not checked again.
    awk '/^\[/ { inside = /^\[profile\.dev/ } inside' Cargo.toml
} >"$scratch/Cargo.toml"
# The versions this workspace is tested with, already downloaded.
cp Cargo.lock "$scratch/Cargo.lock"

for line in "${packages[@]}"; do
    read -r name _ <<<"$line"
    # The library and binaries, as cargo's verification builds them.
    echo "publish-check: cargo check -p $name (from its .crate)"
    (cd "$scratch" && cargo check --offline --quiet -p "$name") ||
        fail "$name does not compile from its packaged sources (target/publish-check)"
done

echo "publish-check: ${#packages[@]} crates can be published"
