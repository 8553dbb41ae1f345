#!/usr/bin/env bash
# System packages the tests need: the facility's Tango database (C++ DataBaseds on
# MariaDB), Starter, TangoAccessControl, tango_admin, and the X/Qt libraries of the
# GUI tests.
# Idempotent. As root it installs what is missing; as another user it prints what
# is missing (for an administrator to install) and exits 0.
set -euo pipefail

PACKAGES=(
    mariadb-server tango-db tango-starter tango-accesscontrol libtango-tools
    xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxkbcommon-x11-0
    libgl1 libegl1 libfontconfig1 libdbus-1-3
)

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "system-packages: not a Debian/Ubuntu system; install the equivalents of: ${PACKAGES[*]}" >&2
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system-packages: all installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "system-packages: missing (install as root; the facility-database, Starter and access-control tests need them):" >&2
    echo "  apt-get install ${missing[*]}" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# tango-db asks dbconfig-common to create its schema; tests/facility.py creates it
# itself, so the package is told not to (it would fail while MariaDB is not running).
echo "tango-db tango-db/dbconfig-install boolean false" | debconf-set-selections
# tango-common asks for the TANGO_HOST of /etc/tangorc; the tests always set their own.
echo "tango-common tango-common/tango-host string localhost:10000" | debconf-set-selections
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
# Debian starts services from maintainer scripts when it can; the tests start their own.
echo "system-packages: installed ${missing[*]}"
