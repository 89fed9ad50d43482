#!/usr/bin/env bash
# Make sure a headless-capable Chromium is available for the browser test of the lab report
# (tests/report/test_browser_report.py). Debian/Ubuntu: installs the distribution's `chromium` package
# when /usr/bin/chromium is missing. Prints the path of the browser on success; exits non-zero
# (with the reason on stderr) when it cannot be installed (no root, no apt, no network).
set -euo pipefail

for candidate in "${CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then
    echo "$candidate"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: apt-get not available; install Chromium by hand and set CHROMIUM=/path" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "ensure_chromium: need root (or password-less sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq --no-install-recommends chromium >&2

if [ -x /usr/bin/chromium ]; then
  echo /usr/bin/chromium
  exit 0
fi
echo "ensure_chromium: apt-get finished but /usr/bin/chromium is still missing" >&2
exit 1
