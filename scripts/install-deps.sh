#!/usr/bin/env bash
# Installs the Debian 12 packages spear builds with (docs/DESIGN.md says why each).
# Does nothing for packages already present.
set -euo pipefail
pkgs=(build-essential cmake pkg-config nlohmann-json3-dev libpcre2-dev libcli11-dev
      libcpp-httplib-dev zlib1g-dev libopenblas-dev libgtest-dev libbenchmark-dev
      python3-jinja2)  # python3-jinja2: tests render chat templates with Jinja2 to compare
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "spear: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
