#!/usr/bin/env bash
# What the tests need from the system besides Python: Chromium and its WebDriver, for the browser tests
# (tests/test_page.py). Installs them with apt-get when they are missing and this is root on a Debian-like
# system; otherwise it says how, and the browser tests skip (or fail, under CI=true).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
  echo "ci_setup: installed $(chromium --version)"
else
  echo "ci_setup: chromium and chromedriver are missing; install them (apt-get install chromium chromium-driver)" \
       "or the browser tests skip" >&2
fi
