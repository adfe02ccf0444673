#!/usr/bin/env bash
# A fleet on one host, to try fleet mode (docs/fleet.md): Redis on 127.0.0.1, three VMs as
# network namespaces (a veth pair each, 10.77.N.1 here and 10.77.N.2 in the VM), each running
# `aether serve --fleet-...` with the eBPF probe and a demo http.server on port 8000, and two
# gateways on 127.0.0.1:8081 and :8082 for *.fleet.localhost. It prints the URLs to open.
#
#   deploy/fleet-demo.sh          start it (as root; `make fleet-demo` does this)
#   deploy/fleet-demo.sh stop     end every process it started and remove the namespaces
#
# Everything it makes is named after AETHER_DEMO_NAME (aether-demo) and kept in AETHER_DEMO_DIR
# (/run/aether-fleet-demo): pid files, logs, the fleet key, the VMs' state. AETHER_DEMO_NET
# (10.77), AETHER_DEMO_REDIS_PORT (6390) and AETHER_DEMO_GATEWAY_PORTS ("8081 8082") move it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NAME=${AETHER_DEMO_NAME:-aether-demo}
DIR=${AETHER_DEMO_DIR:-/run/aether-fleet-demo}
NET=${AETHER_DEMO_NET:-10.77}
REDIS_PORT=${AETHER_DEMO_REDIS_PORT:-6390}
read -r -a GATEWAY_PORTS <<< "${AETHER_DEMO_GATEWAY_PORTS:-8081 8082}"
DOMAIN=fleet.localhost
VMS=(1 2 3)
APP_PORT=8000
VM_PORT=3001
AETHER=$ROOT/.venv/bin/aether
PY=$ROOT/.venv/bin/python

say() { echo "fleet-demo: $*" >&2; }
die() { say "$*"; exit 1; }

[[ $NAME =~ ^[a-z][a-z0-9-]{0,10}$ ]] || die "AETHER_DEMO_NAME=$NAME: up to 11 of a-z, 0-9, - (it names network links)"
[[ $NET =~ ^[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "AETHER_DEMO_NET=$NET: the first two numbers of an IPv4 address, like 10.77"
[ "$(id -u)" = 0 ] || die "run as root: the VMs are network namespaces and their probes need CAP_BPF"

ns() { echo "$NAME$1"; }               # the VM's network namespace
here() { echo "$NAME$1h"; }            # its link's end in this namespace
enter() { echo "--net=/run/netns/$(ns "$1")"; }

# Ends the process of a pid file if it is still the one started: its command line holds $2.
end_pidfile() {
    local file=$1 mark=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$mark"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    local n pid
    for file in "$DIR"/gateway-*.pid "$DIR"/vm-*.pid "$DIR"/app-*.pid; do
        end_pidfile "$file" "$DIR"
    done
    end_pidfile "$DIR/redis.pid" ":$REDIS_PORT"  # redis-server names itself ADDR:PORT
    for n in "${VMS[@]}"; do
        if [ -e "/run/netns/$(ns "$n")" ]; then
            # Whatever else runs in a namespace of ours is ours too.
            for pid in $(ip netns pids "$(ns "$n")" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$(ns "$n")"
        fi
        ip link del "$(here "$n")" 2>/dev/null || true
    done
    rm -rf "$DIR"
    say "stopped: no process, namespace or file of the demo is left"
}

# Waits until the file $1 holds the text $2 (a log line), for up to $3 s; else shows the log's end.
wait_log() {
    local file=$1 text=$2 seconds=$3 i
    for i in $(seq $((seconds * 10))); do
        grep -q -- "$text" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    tail -n 20 "$file" >&2 || true
    return 1
}

start() {
    [ -x "$AETHER" ] || die "no $AETHER: run bash deploy/setup.sh first"
    command -v redis-server > /dev/null || die "redis-server is not installed (deploy/setup.sh installs it)"
    for n in "${VMS[@]}"; do
        [ ! -e "/run/netns/$(ns "$n")" ] || die "a demo is running already (namespace $(ns "$n")): deploy/fleet-demo.sh stop"
    done
    [ ! -e "$DIR" ] || die "$DIR exists: a demo is running already, or was not stopped: deploy/fleet-demo.sh stop"
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    trap 'say "failed: cleaning up"; stop' ERR

    # One key for the whole fleet, on every VM and gateway.
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/fleet.key")

    local n binds=127.0.0.1
    for n in "${VMS[@]}"; do
        ip netns add "$(ns "$n")"
        ip link add "$(here "$n")" type veth peer name "$(ns "$n")t" netns "$(ns "$n")"
        ip addr add "$NET.$n.1/30" dev "$(here "$n")"
        ip link set "$(here "$n")" up
        ip -n "$(ns "$n")" link set lo up
        ip -n "$(ns "$n")" addr add "$NET.$n.2/30" dev "$(ns "$n")t"
        ip -n "$(ns "$n")" link set "$(ns "$n")t" up
        binds="$binds $NET.$n.1"
    done

    # Redis: loopback for the gateways, each VM's side of its link for the VMs. Nothing saved.
    redis-server --port "$REDIS_PORT" --bind "$binds" --protected-mode no --save "" --appendonly no \
        --daemonize yes --pidfile "$DIR/redis.pid" --dir "$DIR" --logfile "$DIR/redis.log"
    wait_log "$DIR/redis.log" "Ready to accept connections" 10 || die "Redis did not start on $REDIS_PORT"

    for n in "${VMS[@]}"; do
        local project token
        project=$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
        token=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
        echo "$project $token" > "$DIR/vm-$n.id"
        mkdir -p "$DIR/vm-$n/state" "$DIR/vm-$n/www"
        echo "<h1>Hello from VM $n</h1><p>workspace demo-$n, served through a fleet gateway.</p>" > "$DIR/vm-$n/www/index.html"
        # nsenter and nohup exec() what they run: $! is aether's pid.
        nsenter "$(enter "$n")" nohup "$AETHER" serve --host 0.0.0.0 --port "$VM_PORT" --backend ebpf \
            --state-dir "$DIR/vm-$n/state" --project-id "$project" --workspace-id "demo-$n" --token="$token" \
            --preview-domain "$DOMAIN" --fleet-redis "redis://$NET.$n.1:$REDIS_PORT/0" \
            --fleet-advertise "$NET.$n.2:$VM_PORT" --fleet-key-file "$DIR/fleet.key" \
            > "$DIR/vm-$n.out" 2> "$DIR/vm-$n.log" < /dev/null &
        echo $! > "$DIR/vm-$n.pid"
    done
    for n in "${VMS[@]}"; do
        wait_log "$DIR/vm-$n.log" '"msg":"serving"' 120 || die "VM $n's aether did not start (log: $DIR/vm-$n.log)"
        nsenter "$(enter "$n")" nohup "$PY" -m http.server "$APP_PORT" --bind 127.0.0.1 --directory "$DIR/vm-$n/www" \
            > /dev/null 2> "$DIR/app-$n.log" < /dev/null &
        echo $! > "$DIR/app-$n.pid"
    done

    local port
    for port in "${GATEWAY_PORTS[@]}"; do
        nohup "$AETHER" gateway --redis "redis://127.0.0.1:$REDIS_PORT/0" --host 127.0.0.1 --port "$port" \
            --preview-domain "$DOMAIN" --fleet-key-file "$DIR/fleet.key" --metrics-public \
            > "$DIR/gateway-$port.out" 2> "$DIR/gateway-$port.log" < /dev/null &
        echo $! > "$DIR/gateway-$port.pid"
    done
    for port in "${GATEWAY_PORTS[@]}"; do
        wait_log "$DIR/gateway-$port.out" "aether gateway on" 30 || die "the gateway on $port did not start"
    done

    # Ready when every gateway serves every VM's app (its probe saw the port, Redis has it).
    for n in "${VMS[@]}"; do
        read -r project token < "$DIR/vm-$n.id"
        for port in "${GATEWAY_PORTS[@]}"; do
            "$PY" - "$port" "$APP_PORT-${project:0:6}.$DOMAIN" "$token" <<'EOF' || die "the gateway on $port does not serve VM $n"
import http.client, sys, time
port, host, token = sys.argv[1:]
deadline = time.monotonic() + 30
while True:
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host, "Authorization": f"Bearer {token}"})
        if conn.getresponse().status == 200:
            break
    except OSError:
        pass
    finally:
        conn.close()
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
EOF
        done
    done
    trap - ERR

    echo "A fleet of ${#VMS[@]} VMs behind ${#GATEWAY_PORTS[@]} gateways is running. Open (each sets a cookie, then drops the token):"
    for n in "${VMS[@]}"; do
        read -r project token < "$DIR/vm-$n.id"
        for port in "${GATEWAY_PORTS[@]}"; do
            echo "  VM $n: http://$APP_PORT-${project:0:6}.$DOMAIN:$port/?token=$token"
        done
    done
    echo "Listen on another port in a VM and it is a preview at once, e.g.:"
    echo "  nsenter --net=/run/netns/$(ns 1) python3 -m http.server 5173 --bind 127.0.0.1"
    echo "  then http://5173-$(read -r p _ < "$DIR/vm-1.id"; echo "${p:0:6}").$DOMAIN:${GATEWAY_PORTS[0]}/?token=..."
    echo "The fleet: $AETHER fleet status --redis redis://127.0.0.1:$REDIS_PORT/0"
    echo "Health: curl http://127.0.0.1:${GATEWAY_PORTS[0]}/healthz    Logs: $DIR/*.log"
    echo "Stop it: deploy/fleet-demo.sh stop"
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    *) die "usage: deploy/fleet-demo.sh [start|stop]" ;;
esac
