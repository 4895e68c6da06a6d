#!/usr/bin/env bash
# The real parts the tests drive, from Debian: Chromium + ChromeDriver (the review page), PostgreSQL (the
# shared review queue), nginx (the load balancer of the drain test), Prometheus + promtool (scraping, rules).
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
# The packages start system services where an init system runs; the tests start their own instances.
for service in nginx prometheus postgresql; do $SUDO service "$service" stop >/dev/null 2>&1 || true; done
