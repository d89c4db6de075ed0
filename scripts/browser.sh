#!/usr/bin/env bash
# Browser tests drive Debian's Chromium through Playwright (Playwright's own browser download
# does not work offline). Install it when missing and we are root on Debian/Ubuntu.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "Installing Debian's chromium for the browser tests…"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "chromium is missing: the browser tests will be skipped. Install it with: sudo apt-get install chromium" >&2
  exit 1
fi
