#!/usr/bin/env bash
# Debian packages dskd needs: WordNet 3.0 (lexicon, corpus glosses) and the mythes thesaurus.
# Installs them when running as root and they are missing; otherwise prints the exact command.
set -euo pipefail
PKGS="wordnet-base wordnet-sense-index mythes-en-us"
if [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/wordnet/index.sense ] && [ -f /usr/share/mythes/th_en_US_v2.dat ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: $PKGS"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PKGS >/dev/null
else
  echo "missing Debian packages; run as root: apt-get update && apt-get install -y $PKGS" >&2
  exit 1
fi
