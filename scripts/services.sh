#!/usr/bin/env bash
# Make sure RabbitMQ and Redis answer, starting them if they don't.
#
#   bash scripts/services.sh
#
# Idempotent: a service that already answers is left alone. Otherwise the
# script starts it with Docker when a Docker engine works (development
# containers `flotilla-dev-rabbitmq` and `flotilla-dev-redis` with the default
# credentials; docker-compose.yml is the locked-down deployment and needs its
# secrets), else installs the Debian package if
# needed and starts it locally (RabbitMQ on 127.0.0.1:5672 with guest/guest,
# Redis on 127.0.0.1:6379 without persistence).
#
# Environment:
#   FLOTILLA_AMQP_URL   default amqp://guest:guest@127.0.0.1:5672/%2f
#   FLOTILLA_REDIS_URL  default redis://127.0.0.1:6379/0
#     If one of them points at a host that is not loopback, that service is
#     only probed, never started here.
#
# Needs no stdin: under CI (no terminal) `sudo` is used with -n, so it fails
# instead of prompting for a password.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.flotilla-run"
# Debian installs the broker's tools in /usr/sbin, which is not in a normal
# user's PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

DEFAULT_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
DEFAULT_REDIS_URL="redis://127.0.0.1:6379/0"
RABBITMQ_WAIT_SECS=90
REDIS_WAIT_SECS=30

log() { printf '[services] %s\n' "$*"; }
warn() { printf '[services] warning: %s\n' "$*"; }
die() {
    printf '[services] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- URLs ----

# parse_url URL PLAIN_PORT TLS_PORT TLS_SCHEME -> sets URL_SCHEME, URL_HOST,
# URL_PORT. Handles user:password@, [IPv6] hosts, a missing port (the
# scheme's default) and a path/query.
parse_url() {
    local url=$1 plain_port=$2 tls_port=$3 tls_scheme=$4 rest
    if [[ $url == *://* ]]; then
        URL_SCHEME=${url%%://*}
        rest=${url#*://}
    else
        URL_SCHEME=""
        rest=$url
    fi
    rest=${rest%%[/?#]*} # authority only
    rest=${rest##*@}     # drop user:password@
    if [[ $rest == \[* ]]; then
        URL_HOST=${rest%%]*}
        URL_HOST=${URL_HOST#[}
        URL_PORT=${rest#*]}
    else
        URL_HOST=${rest%%:*}
        URL_PORT=${rest#"$URL_HOST"}
    fi
    URL_PORT=${URL_PORT#:}
    [[ -n $URL_HOST ]] || URL_HOST=127.0.0.1
    if [[ -z $URL_PORT ]]; then
        if [[ $URL_SCHEME == "$tls_scheme" ]]; then URL_PORT=$tls_port; else URL_PORT=$plain_port; fi
    fi
    [[ $URL_PORT =~ ^[0-9]+$ ]] || die "cannot read a port in URL host part '$rest'"
}

is_loopback() {
    case "$1" in
    localhost | localhost.localdomain | ip6-localhost | 127.* | ::1 | 0:0:0:0:0:0:0:1) return 0 ;;
    *) return 1 ;;
    esac
}

# -------------------------------------------------------------- probes ----

# The probes below pass host and port as $1/$2 of an inner bash on purpose.
# shellcheck disable=SC2016
tcp_answers() { # host port
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# Send the AMQP 0-9-1 protocol header; a broker that is up answers with a
# connection.start method frame, whose first byte is the frame type 1.
# shellcheck disable=SC2016
amqp_answers() { # host port
    local first
    first=$(timeout 5 bash -c \
        'exec 3<>"/dev/tcp/$1/$2" || exit 1; printf "AMQP\x00\x00\x09\x01" >&3; head -c 1 <&3' \
        _ "$1" "$2" 2>/dev/null | od -An -tx1 | tr -d ' \n') || true
    [[ $first == 01 ]]
}

# PING in RESP; +PONG means up, -NOAUTH/-NOPERM means up but password
# protected (the clients will authenticate). -LOADING means not ready yet.
# shellcheck disable=SC2016
redis_answers() { # host port
    local line
    line=$(timeout 5 bash -c \
        'exec 3<>"/dev/tcp/$1/$2" || exit 1; printf "PING\r\n" >&3; IFS= read -r l <&3; printf "%s" "$l"' \
        _ "$1" "$2" 2>/dev/null) || true
    case "$line" in
    +PONG* | -NOAUTH* | -NOPERM* | -WRONGPASS*) return 0 ;;
    *) return 1 ;;
    esac
}

rabbitmq_answers() {
    if [[ $AMQP_SCHEME == amqps ]]; then tcp_answers "$AMQP_HOST" "$AMQP_PORT"; else amqp_answers "$AMQP_HOST" "$AMQP_PORT"; fi
}

redis_up() {
    if [[ $REDIS_SCHEME == rediss ]]; then tcp_answers "$REDIS_HOST" "$REDIS_PORT"; else redis_answers "$REDIS_HOST" "$REDIS_PORT"; fi
}

# ---------------------------------------------------------- privileges ----

is_root() { [[ $(id -u) -eq 0 ]]; }

# Run a command as root: directly, or with sudo (prompting only when there
# is a terminal to prompt on).
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [[ -t 0 ]]; then sudo "$@"; else sudo -n "$@"; fi
    else
        printf '[services] ERROR: need root for: %s (and sudo is not installed)\n' "$*" >&2
        return 1
    fi
}

# For optional steps: root without asking anyone for a password.
can_root_quietly() {
    is_root || { command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; }
}

as_root_quietly() {
    if is_root; then "$@"; else sudo -n "$@"; fi
}

systemd_running() {
    [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1
}

# -------------------------------------------------------------- docker ----

COMPOSE=()
docker_usable() {
    command -v docker >/dev/null 2>&1 || return 1
    timeout 20 docker info >/dev/null 2>&1 || return 1
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then
        COMPOSE=(docker-compose)
    else
        log "the Docker engine works but neither 'docker compose' nor 'docker-compose' is installed"
        return 1
    fi
}

# ------------------------------------------------------------------ apt ----

apt_install() { # package
    command -v apt-get >/dev/null 2>&1 ||
        die "$1 is not installed and apt-get is not available: install $1 (or Docker) and rerun"
    log "installing the Debian package $1 (apt-get install -y $1)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" </dev/null; then
        log "apt-get install failed; running apt-get update and trying again"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null ||
            warn "apt-get update failed"
        # The package's own start attempt may fail in a container without an
        # init system; that is not fatal as long as the program got installed.
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" </dev/null ||
            warn "apt-get install -y $1 reported an error"
    fi
}

# ------------------------------------------------------------ RabbitMQ ----

wait_for_rabbitmq() { # seconds
    local deadline=$((SECONDS + $1))
    log "waiting up to $1 s for RabbitMQ on $AMQP_HOST:$AMQP_PORT ..."
    until rabbitmq_answers; do
        if ((SECONDS >= deadline)); then
            printf '[services] ERROR: RabbitMQ did not answer on %s:%s within %s s\n' "$AMQP_HOST" "$AMQP_PORT" "$1" >&2
            show_rabbitmq_logs
            exit 1
        fi
        sleep 1
    done
    await_rabbitmq_startup
    log "RabbitMQ answers on $AMQP_HOST:$AMQP_PORT"
}

# The port opens at the end of boot, but `rabbitmqctl await_startup` is the
# authoritative answer when we can run it (root, or the node's cookie).
await_rabbitmq_startup() {
    is_loopback "$AMQP_HOST" || return 0
    [[ -z ${STARTED_WITH_DOCKER:-} ]] || return 0
    command -v rabbitmqctl >/dev/null 2>&1 || return 0
    can_root_quietly || return 0
    if ! as_root_quietly timeout 30 rabbitmqctl -q await_startup --timeout 20 >/dev/null 2>&1; then
        warn "rabbitmqctl await_startup did not succeed (the AMQP port answers, carrying on)"
    fi
}

show_rabbitmq_logs() {
    local f
    for f in /var/log/rabbitmq/startup_err /var/log/rabbitmq/startup_log /var/log/rabbitmq/rabbit@*.log; do
        [[ -r $f && -s $f ]] || continue
        printf '[services] --- last lines of %s ---\n' "$f" >&2
        tail -n 20 "$f" >&2 || true
    done
}

start_rabbitmq_local() {
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        apt_install rabbitmq-server
        command -v rabbitmq-server >/dev/null 2>&1 || die "rabbitmq-server is still not installed"
        if rabbitmq_answers; then
            log "RabbitMQ was started by its package"
            await_rabbitmq_startup
            return 0
        fi
    fi
    if systemd_running && systemctl cat rabbitmq-server.service >/dev/null 2>&1; then
        log "starting RabbitMQ: systemctl start rabbitmq-server"
        as_root systemctl start rabbitmq-server ||
            warn "systemctl start rabbitmq-server failed; trying rabbitmq-server -detached"
    fi
    if ! rabbitmq_answers; then
        log "starting RabbitMQ: rabbitmq-server -detached"
        # If a node is already booting this fails with "already running";
        # waiting for the port below covers that case too.
        as_root rabbitmq-server -detached </dev/null ||
            warn "rabbitmq-server -detached exited with an error (a node may already be booting)"
    fi
    wait_for_rabbitmq "$RABBITMQ_WAIT_SECS"
}

# Management UI (http://localhost:15672/): best effort, in the background.
maybe_enable_management() {
    is_loopback "$AMQP_HOST" || return 0
    [[ -z ${STARTED_WITH_DOCKER:-} ]] || return 0 # the compose image has it on
    if tcp_answers "$AMQP_HOST" 15672; then
        log "RabbitMQ management UI: http://localhost:15672/"
        return 0
    fi
    command -v rabbitmq-plugins >/dev/null 2>&1 || return 0
    if ! can_root_quietly; then
        log "not enabling the management UI (needs root): sudo rabbitmq-plugins enable rabbitmq_management"
        return 0
    fi
    mkdir -p "$RUN_DIR"
    log "enabling the RabbitMQ management UI in the background (log: .flotilla-run/rabbitmq-plugins.log)"
    (as_root_quietly rabbitmq-plugins enable rabbitmq_management \
        >"$RUN_DIR/rabbitmq-plugins.log" 2>&1 </dev/null || true) &
    disown 2>/dev/null || true
}

# --------------------------------------------------------------- Redis ----

wait_for_redis() { # seconds
    local deadline=$((SECONDS + $1))
    log "waiting up to $1 s for Redis on $REDIS_HOST:$REDIS_PORT ..."
    until redis_up; do
        if ((SECONDS >= deadline)); then
            printf '[services] ERROR: Redis did not answer on %s:%s within %s s\n' "$REDIS_HOST" "$REDIS_PORT" "$1" >&2
            if [[ -s $RUN_DIR/redis-server.log ]]; then
                printf '[services] --- last lines of %s ---\n' "$RUN_DIR/redis-server.log" >&2
                tail -n 20 "$RUN_DIR/redis-server.log" >&2 || true
            fi
            exit 1
        fi
        sleep 0.5
    done
    log "Redis answers on $REDIS_HOST:$REDIS_PORT"
}

start_redis_local() {
    if ! command -v redis-server >/dev/null 2>&1; then
        apt_install redis-server
        command -v redis-server >/dev/null 2>&1 || die "redis-server is still not installed"
        if redis_up; then
            log "Redis was started by its package"
            return 0
        fi
    fi
    if systemd_running && systemctl cat redis-server.service >/dev/null 2>&1; then
        log "starting Redis: systemctl start redis-server"
        as_root systemctl start redis-server || warn "systemctl start redis-server failed"
        if redis_up; then
            log "Redis answers on $REDIS_HOST:$REDIS_PORT"
            return 0
        fi
    fi
    mkdir -p "$RUN_DIR"
    log "starting Redis: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no"
    # Runs as the current user, no persistence (a scratch server for dev
    # and tests); log in .flotilla-run/redis-server.log.
    (cd "$RUN_DIR" && redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
        --save "" --appendonly no --logfile "$RUN_DIR/redis-server.log" </dev/null) ||
        warn "redis-server exited with an error"
    wait_for_redis "$REDIS_WAIT_SECS"
}

# ---------------------------------------------------------------- main ----

parse_url "${FLOTILLA_AMQP_URL:-$DEFAULT_AMQP_URL}" 5672 5671 amqps
AMQP_SCHEME=$URL_SCHEME AMQP_HOST=$URL_HOST AMQP_PORT=$URL_PORT
parse_url "${FLOTILLA_REDIS_URL:-$DEFAULT_REDIS_URL}" 6379 6379 rediss
REDIS_SCHEME=$URL_SCHEME REDIS_HOST=$URL_HOST REDIS_PORT=$URL_PORT

case "$REDIS_SCHEME" in
redis+unix | unix)
    die "FLOTILLA_REDIS_URL is a unix socket URL; services.sh only manages TCP services"
    ;;
esac

need_rabbitmq=""
need_redis=""

if rabbitmq_answers; then
    await_rabbitmq_startup
    log "RabbitMQ already answers on $AMQP_HOST:$AMQP_PORT: nothing to do"
elif ! is_loopback "$AMQP_HOST"; then
    die "RabbitMQ at $AMQP_HOST:$AMQP_PORT (from FLOTILLA_AMQP_URL) does not answer; it is not local, so services.sh will not start it"
elif [[ $AMQP_PORT != 5672 ]]; then
    die "nothing answers on $AMQP_HOST:$AMQP_PORT (FLOTILLA_AMQP_URL); services.sh only starts RabbitMQ on port 5672"
else
    log "RabbitMQ does not answer on $AMQP_HOST:$AMQP_PORT"
    need_rabbitmq=1
fi

if redis_up; then
    log "Redis already answers on $REDIS_HOST:$REDIS_PORT: nothing to do"
elif ! is_loopback "$REDIS_HOST"; then
    die "Redis at $REDIS_HOST:$REDIS_PORT (from FLOTILLA_REDIS_URL) does not answer; it is not local, so services.sh will not start it"
elif [[ $REDIS_PORT != 6379 ]]; then
    die "nothing answers on $REDIS_HOST:$REDIS_PORT (FLOTILLA_REDIS_URL); services.sh only starts Redis on port 6379"
else
    log "Redis does not answer on $REDIS_HOST:$REDIS_PORT"
    need_redis=1
fi

if [[ -n $need_rabbitmq || -n $need_redis ]]; then
    if docker_usable; then
        # Development services with the default credentials (guest/guest,
        # Redis without a password), on loopback only. docker-compose.yml is
        # the locked-down deployment and needs secrets set; it is not used
        # for this.
        if [[ -n $need_rabbitmq ]]; then
            conf="$(mktemp -d)/rabbitmq.conf"
            printf 'loopback_users = none\n' >"$conf"
            chmod a+r "$conf"
            log "Docker works: docker run rabbitmq:3.13-management (guest/guest on 127.0.0.1:5672)"
            docker run -d --name flotilla-dev-rabbitmq -p 127.0.0.1:5672:5672 -p 127.0.0.1:15672:15672 \
                -v "$conf:/etc/rabbitmq/conf.d/90-flotilla-dev.conf:ro" rabbitmq:3.13-management </dev/null ||
                docker start flotilla-dev-rabbitmq </dev/null ||
                die "docker run rabbitmq failed"
        fi
        if [[ -n $need_redis ]]; then
            log "Docker works: docker run redis:7 (127.0.0.1:6379, append-only file on)"
            docker run -d --name flotilla-dev-redis -p 127.0.0.1:6379:6379 redis:7 \
                redis-server --appendonly yes </dev/null ||
                docker start flotilla-dev-redis </dev/null ||
                die "docker run redis failed"
        fi
        STARTED_WITH_DOCKER=1
        [[ -z $need_redis ]] || wait_for_redis "$REDIS_WAIT_SECS"
        [[ -z $need_rabbitmq ]] || wait_for_rabbitmq "$RABBITMQ_WAIT_SECS"
    else
        log "no working Docker engine: using local Debian packages"
        [[ -z $need_rabbitmq ]] || start_rabbitmq_local
        [[ -z $need_redis ]] || start_redis_local
    fi
fi

maybe_enable_management

log "ready: RabbitMQ $AMQP_HOST:$AMQP_PORT, Redis $REDIS_HOST:$REDIS_PORT"
