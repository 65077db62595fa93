#!/usr/bin/env bash
# Installs the Debian packages the workbench uses when they are missing:
# fluidsynth (libfluidsynth, for audio), chromium (the browser test of the player) and abcmidi
# (abc2midi: the second opinion on the bar checker, benchmarks/bench_abc2midi.py and its test).
set -u
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ldconfig -p 2>/dev/null | grep -q libfluidsynth || missing+=(fluidsynth)
command -v abc2midi >/dev/null 2>&1 || missing+=(abcmidi)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "warning: could not install ${missing[*]}; audio falls back to a sine synth, the browser test fails in CI, the abc2midi test is skipped"
else
  echo "note: please install ${missing[*]} (e.g. sudo apt-get install ${missing[*]}):"
  echo "      audio falls back to a sine synth, the browser test cannot run and the abc2midi"
  echo "      comparison (make bench, tests/test_abc_standard.py) is skipped without them."
fi
exit 0
