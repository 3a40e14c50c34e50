#!/usr/bin/env bash
# What the tests need from the system besides Python: Chromium and its WebDriver, for the browser tests
# (tests/test_page.py), and libmagic, which the IIIF reference server (pip `iiif`, tests/iiifserver.py) loads.
# Installs what is missing with apt-get when this is root on a Debian-like system; otherwise it says how, and
# the tests needing it skip (or fail, under CI=true).
set -euo pipefail
missing=()
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  missing+=(chromium chromium-driver)
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1'; then
  missing+=(libmagic1)
fi
if [ ${#missing[@]} = 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  echo "ci_setup: installed ${missing[*]}"
else
  echo "ci_setup: ${missing[*]} missing; install them (apt-get install ${missing[*]})" \
       "or the tests needing them skip" >&2
fi
