#!/usr/bin/env bash
# Debian packages the tests use: Fashion-MNIST (dataset-fashion-mnist; tests/test_data.py) and a
# headless browser (chromium, chromium-driver; tests/test_lab.py). Idempotent; needs root.
# Exits non-zero with the reason when it cannot install them.
set -uo pipefail
PACKAGES=(dataset-fashion-mnist chromium chromium-driver)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "system-packages: all present (${PACKAGES[*]})"; exit 0; }
[ "$(id -u)" -eq 0 ] || { echo "system-packages: not root; missing ${missing[*]}" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "system-packages: no apt-get; missing ${missing[*]}" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
    || { echo "system-packages: apt-get could not install ${missing[*]}" >&2; exit 1; }
echo "system-packages: installed ${missing[*]}"
