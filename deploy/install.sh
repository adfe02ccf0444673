#!/usr/bin/env bash
# Install aether as a systemd service, idempotently: the set-up (deploy/setup.sh, the script CI
# runs), then the unit with ExecStart pointing at this checkout's venv, the locked-down drop-in
# with --user, and /etc/aether/aether.env. Enables and starts the service where systemd runs.
# Each step that changes something says so in one line; a second run changes nothing.
set -euo pipefail
shopt -s lastpipe  # put_file, last in a pipeline, records what changed in this shell
ROOT=$(cd "$(dirname "$0")/.." && pwd)

say() { echo "install: $*" >&2; }
die() { say "$*"; exit 1; }
usage() {
    cat >&2 <<'EOF'
usage: deploy/install.sh [--user NAME] [--set AETHER_NAME=VALUE]... [--destdir DIR]
  --user NAME       run as the system user NAME (created if missing) with
                    deploy/aether-locked-down.conf; without it the service runs as root
  --set NAME=VALUE  an AETHER_* setting for /etc/aether/aether.env, e.g. --set AETHER_HOST=0.0.0.0
  --destdir DIR     write the files under DIR (also $DESTDIR); no user, no systemctl
EOF
    exit 2
}

DESTDIR=${DESTDIR:-}
SERVICE_USER=""
SETTINGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --user) [ $# -ge 2 ] || usage; SERVICE_USER=$2; shift 2 ;;
        --set) [ $# -ge 2 ] || usage; SETTINGS+=("$2"); shift 2 ;;
        --destdir) [ $# -ge 2 ] || usage; DESTDIR=$2; shift 2 ;;
        -h|--help) usage ;;
        *) say "unknown argument: $1"; usage ;;
    esac
done

# Check every argument before anything changes.
if [ -n "$SERVICE_USER" ] && ! [[ $SERVICE_USER =~ ^[a-z_][a-z0-9_-]{0,31}$ ]]; then
    die "--user $SERVICE_USER: not a valid user name"
fi
for setting in ${SETTINGS[@]+"${SETTINGS[@]}"}; do
    [[ $setting =~ ^AETHER_[A-Z0-9_]+=[^$'\n']*$ ]] || die "--set $setting: expected AETHER_NAME=VALUE on one line"
    # systemd's EnvironmentFile= parser unquotes, unescapes and expands these; written plainly
    # they would not reach aether as given (a JSON agent command belongs in config.json).
    case ${setting#*=} in *[\\\"\'\$\`]*)
        die "--set ${setting%%=*}: a value may not hold \\, quotes, \$ or \` (systemd would rewrite it): put it in the state directory's config.json" ;;
    esac
done
[[ ${AETHER_VENV:-.venv} =~ ^[A-Za-z0-9._/+-]+$ ]] || die "AETHER_VENV=$AETHER_VENV: characters a unit file cannot take unquoted"
# The path goes into ExecStart as it is: systemd would split it at a space and expand a %.
[[ $ROOT =~ ^/[A-Za-z0-9._/+-]*$ ]] || die "the checkout path $ROOT has characters a unit file cannot take unquoted; move it (e.g. to /opt/aether)"
if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
elif [ "$(id -u)" != 0 ]; then
    die "run as root (or stage the files with --destdir DIR)"
fi

VENV=${AETHER_VENV:-.venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
UNIT_DIR=$DESTDIR/etc/systemd/system
UNIT=$UNIT_DIR/aether.service
DROPIN=$UNIT_DIR/aether.service.d/locked-down.conf
ENV_FILE=$DESTDIR/etc/aether/aether.env
changed=""

# The venv the unit runs, and everything the probe needs: the same script CI runs.
bash "$ROOT/deploy/setup.sh"
[ -x "$VENV/bin/aether" ] || die "$VENV/bin/aether is missing after deploy/setup.sh"

# put_file DEST MODE: standard input becomes DEST, if it differs.
put_file() {
    local dest=$1 mode=$2 tmp
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$dest.XXXXXX")
    cat > "$tmp"
    chmod "$mode" "$tmp"
    if [ -e "$dest" ] && cmp -s "$tmp" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
        rm -f "$tmp"
        return
    fi
    if [ -e "$dest" ]; then say "updated ${dest#"$DESTDIR"}"; else say "installed ${dest#"$DESTDIR"}"; fi
    mv -f "$tmp" "$dest"
    changed=1
}

sed -e "s|/opt/aether/\.venv|$VENV|g" -e "s|/opt/aether|$ROOT|g" "$ROOT/deploy/aether.service" | put_file "$UNIT" 0644

if [ -n "$SERVICE_USER" ]; then
    sed -e "s/^User=aether$/User=$SERVICE_USER/" -e "s/^Group=aether$/Group=$SERVICE_USER/" \
        "$ROOT/deploy/aether-locked-down.conf" | put_file "$DROPIN" 0644
elif [ -e "$DROPIN" ]; then
    rm -f "$DROPIN"
    rmdir "$(dirname "$DROPIN")" 2>/dev/null || true
    say "removed ${DROPIN#"$DESTDIR"}: the service runs as root"
    changed=1
fi

# The settings file: commented examples once, then only what --set changes. 0600: it may
# hold AETHER_TOKEN, and systemd reads it as root before switching to the service's user.
if [ ! -e "$ENV_FILE" ]; then
    put_file "$ENV_FILE" 0600 <<'EOF'
# aether serve's settings, AETHER_<NAME>=value one a line (names: `aether serve --help`).
# Read by aether.service; after a change: systemctl restart aether
#AETHER_HOST=127.0.0.1
#AETHER_PORT=3001
#AETHER_WORKSPACE_ID=my-workspace
#AETHER_WORKSPACE_ROOT=/home/dev
# Behind the TLS front of deploy/nginx/aether.conf:
#AETHER_PREVIEW_DOMAIN=preview.example.com
#AETHER_PREVIEW_URL=https://{port}-{prefix}.{domain}
#AETHER_LOG_LEVEL=info
EOF
fi
for setting in ${SETTINGS[@]+"${SETTINGS[@]}"}; do
    name=${setting%%=*}
    grep -qxF -- "$setting" "$ENV_FILE" && continue
    { grep -v "^$name=" "$ENV_FILE" || true; echo "$setting"; } | put_file "$ENV_FILE" 0600
done

[ -z "$DESTDIR" ] || exit 0

if [ -n "$SERVICE_USER" ] && ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/aether --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    say "created system user $SERVICE_USER"
fi
if [ -n "$SERVICE_USER" ] && ! runuser -u "$SERVICE_USER" -- "$VENV/bin/python" -c '' 2>/dev/null; then
    say "warning: $SERVICE_USER cannot reach $VENV/bin/python or the Python it links to by itself (a 0700 directory such as /root on the way?): the service will, but only through CAP_DAC_READ_SEARCH"
fi

if [ ! -d /run/systemd/system ]; then
    say "systemd is not running here (no /run/systemd/system): aether.service is installed, not started"
    exit 0
fi
if [ -n "$changed" ]; then
    systemctl daemon-reload
fi
if ! systemctl is-enabled --quiet aether.service; then
    systemctl enable --quiet aether.service
    say "enabled aether.service"
fi
if ! systemctl is-active --quiet aether.service; then
    systemctl start aether.service
    say "started aether.service (journalctl -u aether -f follows it)"
elif [ -n "$changed" ]; then
    systemctl restart aether.service
    say "restarted aether.service: its files changed"
fi
