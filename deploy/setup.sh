#!/usr/bin/env bash
# Set up what aether needs, idempotently: Debian packages (when root), kernel headers for bcc,
# tracefs, the virtualenv with aether installed editable, and Debian's bcc exposed to it.
# Each step that changes something says so in one line; a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*" >&2; }

VENV=${AETHER_VENV:-.venv}
KERNEL=$(uname -r)
ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)

# Debian packages: bcc and its tools, kernel headers for bcc's compiler, the real servers the
# tests listen with (nginx, node; python's http.server needs nothing), the browser the preview
# and dashboard tests drive (chromium, and chromium-driver for selenium), the load generator
# of the benchmarks (wrk) and the footprint benchmark's C baseline (libbpf-tools' tcpstates).
DEB_PACKAGES=(python3-bpfcc bpfcc-tools iproute2 nginx-light nodejs chromium chromium-driver wrk libbpf-tools)
# What the deploy tests check deploy/ with: systemd-analyze (no running systemd needed), and
# openssl for the TLS front's test certificates. Both are there on most hosts already.
DEB_PACKAGES+=(systemd openssl)
# Fleet mode's engine: the tests and the benchmarks start their own redis-server (and a sentinel).
DEB_PACKAGES+=(redis-server)
# Docker, for the tests that name a published port's container: each starts a dockerd of its
# own (its own socket, data and bridge; package scripts start no service here, see apt_install),
# and runs Debian's static busybox as its one image, made without a registry.
DEB_PACKAGES+=(docker.io busybox-static)

missing_debs() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

apt_install() {
    say "installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting services (nginx would take port 80).
    local policy=/usr/sbin/policy-rc.d created=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
    fi
    if ! apt-get install -y -q --no-install-recommends "$@" >/tmp/aether-apt.log 2>&1; then
        apt-get update -q >>/tmp/aether-apt.log 2>&1 || true
        apt-get install -y -q --no-install-recommends "$@" >>/tmp/aether-apt.log 2>&1 ||
            { [ -n "$created" ] && rm -f "$policy"; say "apt-get failed, see /tmp/aether-apt.log"; exit 1; }
    fi
    [ -n "$created" ] && rm -f "$policy"
    return 0
}

if [ "$(id -u)" = 0 ]; then
    mapfile -t need < <(missing_debs "${DEB_PACKAGES[@]}")
    if [ ! -e "/lib/modules/$KERNEL/build" ]; then
        mapfile -t -O "${#need[@]}" need < <(missing_debs "linux-headers-$ARCH")
    fi
    # npm (for wscat) and venv support, only where missing: a Node.js that bundles npm, or a
    # Python that has ensurepip, would conflict with or not need Debian's packages.
    command -v npm >/dev/null || need+=(npm)
    python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
    [ "${#need[@]}" -eq 0 ] || apt_install "${need[@]}"

    # bcc compiles against /lib/modules/$KERNEL/build. Where the running kernel ships no
    # headers, Debian's generic ones serve a probe that reads only tracepoint arguments.
    if [ ! -e "/lib/modules/$KERNEL/build" ]; then
        headers=$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -n 1 || true)
        common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -n "$headers" ]; then
            mkdir -p "/lib/modules/$KERNEL"
            ln -sfn "$headers" "/lib/modules/$KERNEL/build"
            say "no headers for kernel $KERNEL: linked /lib/modules/$KERNEL/build -> $headers"
            if [ ! -e "/lib/modules/$KERNEL/source" ] && [ -n "$common" ]; then
                ln -sfn "$common" "/lib/modules/$KERNEL/source"
                say "linked /lib/modules/$KERNEL/source -> $common"
            fi
        else
            say "no kernel headers found under /usr/src: the eBPF probe cannot compile"
        fi
    fi

    # The tracepoint is found through tracefs.
    if [ ! -e /sys/kernel/tracing/events ] && [ ! -e /sys/kernel/debug/tracing/events ]; then
        if mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; then
            say "mounted tracefs on /sys/kernel/tracing"
        else
            say "could not mount tracefs on /sys/kernel/tracing"
        fi
    fi
fi

# Python 3.11+: the pyenv one if there is one, not Debian's.
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PYTHON=$candidate
            break
        fi
    done
fi
[ -n "$PYTHON" ] || { say "Python 3.11 or newer is needed"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.aether-installed"
if [ ! -e "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing aether (editable) with its test extra into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' >&2
    touch "$stamp"
fi

# Debian's bcc is pure Python over libbcc.so: expose that one package, not all of dist-packages.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
    ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
    say "exposed Debian's bcc to $VENV"
fi

# wscat, the WebSocket client the README shows, and ws, the WebSocket server of the preview
# tests' node app, installed locally (not globally) from npm.
# wscat 4: it is the last on ws 7, which sends `-s "Bearer, TOKEN"` (the protocol's documented command) as
# given; wscat 5 and 6 (ws 8) refuse a subprotocol containing ", " before connecting.
WSCAT_VERSION=4.0.1
WS_VERSION=8.18.3
if command -v npm >/dev/null && {
    ! grep -qs "\"version\": \"$WSCAT_VERSION\"" .tools/node_modules/wscat/package.json ||
        ! grep -qs "\"version\": \"$WS_VERSION\"" .tools/node_modules/ws/package.json; }; then
    say "installing wscat $WSCAT_VERSION and ws $WS_VERSION into .tools/"
    npm install --silent --no-audit --no-fund --prefix .tools "wscat@$WSCAT_VERSION" "ws@$WS_VERSION" >&2 ||
        say "npm could not install wscat and ws; the wscat and node WebSocket tests will fail"
fi

# Vite with @vitejs/plugin-basic-ssl (a self-signed HTTPS dev server, and its HMR WebSocket),
# for the preview's TLS-upstream test; in its own prefix so wscat's install stays as it is.
VITE_VERSION=8.4.1
BASIC_SSL_VERSION=2.3.0
if command -v npm >/dev/null && {
    ! grep -qs "\"version\": \"$VITE_VERSION\"" .tools/vite/node_modules/vite/package.json ||
        ! grep -qs "\"version\": \"$BASIC_SSL_VERSION\"" .tools/vite/node_modules/@vitejs/plugin-basic-ssl/package.json; }; then
    say "installing vite $VITE_VERSION and @vitejs/plugin-basic-ssl $BASIC_SSL_VERSION into .tools/vite/"
    npm install --silent --no-audit --no-fund --prefix .tools/vite "vite@$VITE_VERSION" "@vitejs/plugin-basic-ssl@$BASIC_SSL_VERSION" >&2 ||
        say "npm could not install vite; the Vite preview test will fail"
fi

# One line on how ports will be watched.
"$VENV/bin/python" - <<'PY' >&2
from aether.ports.ebpf import ProbeUnavailable, check_environment
try:
    check_environment()
    print("setup: eBPF ready: ports are watched by the probe on sock:inet_sock_set_state")
except ProbeUnavailable as exc:
    print(f"setup: eBPF unavailable ({exc}): the sock_diag backend will be used")
PY
