#!/usr/bin/env bash
# Installs the Debian packages the workbench uses when they are missing:
# fluidsynth (libfluidsynth, for audio) and chromium (the browser test of the player).
set -u
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ldconfig -p 2>/dev/null | grep -q libfluidsynth || missing+=(fluidsynth)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "warning: could not install ${missing[*]}; audio falls back to a sine synth, the browser test fails in CI"
else
  echo "note: please install ${missing[*]} (e.g. sudo apt-get install ${missing[*]}):"
  echo "      audio falls back to a sine synth and the browser test cannot run without them."
fi
exit 0
