#!/bin/sh
# Installs what `python -m bench` compares against and drives load with
# (valgrind: `python -m bench.instructions`).
# Without them the bench still runs: a built-in upstream, no nginx/HAProxy
# rows, and a Python load generator (which it reports as a possible bottleneck).
set -e
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx haproxy wrk valgrind
# The packaged nginx starts a system service on port 80; the bench runs its own.
$SUDO systemctl disable --now nginx 2>/dev/null || true
python -m pip install -e '.[bench]'
