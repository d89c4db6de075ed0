#!/usr/bin/env bash
# Browser tests drive Debian's Chromium through Playwright (Playwright's own browser download
# does not work offline). Install it when missing and we are root on Debian/Ubuntu; otherwise
# (or when the install fails) exit 1 with what to run, so `make test` stops here instead of
# running the suite without its browser tests.
#
# DISTILLHUB_SKIP_BROWSER_TESTS=1 skips the browser tests, with a warning here and in pytest's
# report: for a developer's machine without Chromium only; CI (.ci/run) never sets it.
# DISTILLHUB_CHROMIUM names a Chromium binary elsewhere than `chromium` on PATH.
set -uo pipefail

if [[ "${DISTILLHUB_SKIP_BROWSER_TESTS:-}" == 1 ]]; then
  cat >&2 <<'MSG'
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARNING: DISTILLHUB_SKIP_BROWSER_TESTS=1: the browser tests (real pages in headless Chromium)
are SKIPPED. Never set it in CI; unset it to run them.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
MSG
  exit 0
fi

have_chromium() {
  if [[ -n "${DISTILLHUB_CHROMIUM:-}" ]]; then
    [[ -x "$DISTILLHUB_CHROMIUM" ]]
  else
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null
  fi
}

have_chromium && exit 0
if [[ -n "${DISTILLHUB_CHROMIUM:-}" ]]; then
  echo "DISTILLHUB_CHROMIUM=$DISTILLHUB_CHROMIUM is not an executable Chromium." >&2
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "Installing Debian's chromium for the browser tests…"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && have_chromium; then
    exit 0
  fi
  echo "Installing chromium with apt-get failed (see above)." >&2
else
  echo "chromium is missing and cannot be installed here (not root, or no apt-get)." >&2
fi
echo "The browser tests need Chromium: install it with \`sudo apt-get install chromium\` (or set DISTILLHUB_CHROMIUM to a Chromium binary), then run \`make test\` again; on your own machine only, DISTILLHUB_SKIP_BROWSER_TESTS=1 make test runs the rest without them." >&2
exit 1
