#!/usr/bin/env bash
# Render deploy/nginx/aether.conf, the TLS front of aether, to standard output:
#   deploy/render-nginx.sh --api-host aether.example.com --preview-domain preview.example.com \
#       --cert /etc/ssl/aether/fullchain.pem --key /etc/ssl/aether/privkey.pem \
#       > /etc/nginx/conf.d/aether.conf && nginx -t && systemctl reload nginx
# The certificate must cover the API host and *.PREVIEW_DOMAIN (a wildcard: previews are one
# host name per port). Every value is checked before anything is written.
# In front of a fleet's gateways (deploy/nginx/aether-fleet.conf: previews only, no API host):
#   deploy/render-nginx.sh --fleet --preview-domain preview.example.com --cert ... --key ... \
#       --upstream 10.0.0.11:8080 --upstream 10.0.0.12:8080 > /etc/nginx/conf.d/aether-fleet.conf
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "render-nginx: $*" >&2; exit 2; }
usage() {
    die "usage: render-nginx.sh --api-host HOST --preview-domain DOMAIN --cert FILE --key FILE
       [--upstream ADDR:PORT (127.0.0.1:3001)]
   or: render-nginx.sh --fleet --preview-domain DOMAIN --cert FILE --key FILE --upstream ADDR:PORT...
   both: [--https-listen ADDR]... (443, [::]:443)
       [--http-listen ADDR]... (80, [::]:80) [--access-log FILE (/var/log/nginx/access.log)]"
}

API_HOST="" DOMAIN="" CERT="" KEY="" ACCESS_LOG=/var/log/nginx/access.log TEMPLATE=nginx/aether.conf
HTTPS=() HTTP=() UPSTREAMS=()
while [ $# -gt 0 ]; do
    if [ "$1" = --fleet ]; then TEMPLATE=nginx/aether-fleet.conf; shift; continue; fi
    [ $# -ge 2 ] || usage
    case $1 in
        --api-host) API_HOST=$2 ;;
        --preview-domain) DOMAIN=$2 ;;
        --cert) CERT=$2 ;;
        --key) KEY=$2 ;;
        --upstream) UPSTREAMS+=("$2") ;;
        --https-listen) HTTPS+=("$2") ;;
        --http-listen) HTTP+=("$2") ;;
        --access-log) ACCESS_LOG=$2 ;;
        *) usage ;;
    esac
    shift 2
done
[ -n "$DOMAIN" ] && [ -n "$CERT" ] && [ -n "$KEY" ] || usage
if [ "$TEMPLATE" = nginx/aether.conf ]; then
    [ -n "$API_HOST" ] || usage
    [ ${#UPSTREAMS[@]} -le 1 ] || die "--upstream: one aether listener (several are for --fleet's gateways)"
    [ ${#UPSTREAMS[@]} -gt 0 ] || UPSTREAMS=(127.0.0.1:3001)
else
    [ -z "$API_HOST" ] || die "--api-host: a fleet's front has no API host (each VM's aether serves its own)"
    [ ${#UPSTREAMS[@]} -gt 0 ] || die "--fleet needs --upstream ADDR:PORT for each gateway"
    API_HOST=unused.invalid
fi
[ ${#HTTPS[@]} -gt 0 ] || HTTPS=(443 "[::]:443")
[ ${#HTTP[@]} -gt 0 ] || HTTP=(80 "[::]:80")

host_re='^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$'
[[ $API_HOST =~ $host_re ]] || die "--api-host $API_HOST: not a lower-case host name"
[[ $DOMAIN =~ $host_re ]] || die "--preview-domain $DOMAIN: not a lower-case domain"
for file in "$CERT" "$KEY" "$ACCESS_LOG"; do
    [[ $file =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "$file: give an absolute path without spaces or quotes"
done
listen_re='^(([0-9.]+|\[[0-9a-f:]+\]):)?[0-9]{1,5}$'
for upstream in "${UPSTREAMS[@]}"; do
    [[ $upstream =~ ^([0-9.]+|\[[0-9a-f:]+\]|[a-z0-9.-]+):[0-9]{1,5}$ ]] || die "--upstream $upstream: expected ADDR:PORT"
done
for addr in "${HTTPS[@]}" "${HTTP[@]}"; do
    [[ $addr =~ $listen_re ]] || die "listen address $addr: expected PORT or ADDR:PORT"
done

# The http->https redirect names the https port unless it is the default one.
port=${HTTPS[0]##*:}
suffix=$([ "$port" = 443 ] || echo ":$port")

# One `listen` line per address, one `server` line per upstream; every other placeholder is a
# plain substitution.
awk -v https="${HTTPS[*]}" -v http="${HTTP[*]}" -v api="$API_HOST" -v domain="$DOMAIN" \
    -v cert="$CERT" -v key="$KEY" -v upstreams="${UPSTREAMS[*]}" -v suffix="$suffix" -v access_log="$ACCESS_LOG" '
    function fill(line) {
        gsub(/@API_HOST@/, api, line); gsub(/@PREVIEW_DOMAIN@/, domain, line)
        gsub(/@CERT@/, cert, line); gsub(/@KEY@/, key, line)
        gsub(/@HTTPS_PORT_SUFFIX@/, suffix, line)
        gsub(/@ACCESS_LOG@/, access_log, line)
        return line
    }
    function each(line, placeholder, addresses,   n, list, i, copy) {
        n = split(addresses, list, " ")
        for (i = 1; i <= n; i++) { copy = line; gsub(placeholder, list[i], copy); print fill(copy) }
    }
    /@HTTPS_LISTEN@/ { each($0, "@HTTPS_LISTEN@", https); next }
    /@HTTP_LISTEN@/ { each($0, "@HTTP_LISTEN@", http); next }
    /@UPSTREAM@/ { each($0, "@UPSTREAM@", upstreams); next }
    { print fill($0) }
' "$TEMPLATE"
