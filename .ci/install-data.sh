#!/usr/bin/env bash
# Real labelled data for the benchmark (benchmarks/accuracy/data.py), all from Debian packages.
# Idempotent: installs only what is missing. Called by .ci/install.sh.
set -euo pipefail
PKGS="fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-br fortunes-ru
fortunes-cs wordnet-base dict-foldoc manpages manpages-dev dataset-fashion-mnist adwaita-icon-theme oxygen-icon-theme"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
