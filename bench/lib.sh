# bench/lib.sh — shell helpers shared by the benchmark scripts: tools, the release build,
# background processes in a temporary directory and their cleanup, free ports, templates.
# Source it after setting SCRIPT (the script's name, for messages), ROOT and KEEP_TMP.
# A script that leaves more than processes behind (a database schema, a broker's queues)
# defines a function extra_cleanup: cleanup calls it after stopping the processes, before
# the temporary directory goes.

log() { printf '%s\n' "$*" >&2; }
die() {
    log "$SCRIPT: $*"
    exit 1
}

find_nginx() {
    command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true
}

# need_packages CMD...: installs the Debian packages of the same names when a command is missing.
need_packages() {
    local missing=() c
    for c in "$@"; do
        if [[ $c == nginx ]]; then
            [[ -n $(find_nginx) ]] || missing+=(nginx)
        else
            command -v "$c" >/dev/null 2>&1 || missing+=("$c")
        fi
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]} from the distribution's packages"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "need ${missing[*]}; run as root or install them: apt-get install -y ${missing[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

# release_build CARGO-ARGS...: cargo build --release, --locked when Cargo.lock is tracked.
release_build() {
    local cmd=(cargo build --release)
    if git -C "$ROOT" ls-files --error-unmatch Cargo.lock >/dev/null 2>&1; then
        cmd+=(--locked)
    fi
    cmd+=("$@")
    log "building: ${cmd[*]}"
    (cd "$ROOT" && "${cmd[@]}") >&2
}

# idem_and_example_bins EXAMPLE: sets IDEM_BIN and BARE_BIN. Given both in the environment,
# uses them as they are; given neither, target/release/idem and target/release/examples/
# EXAMPLE, built first unless SKIP_BUILD=1.
idem_and_example_bins() {
    if [[ -n ${IDEM_BIN:-} || -n ${BARE_BIN:-} ]]; then
        [[ -x ${IDEM_BIN:-} ]] || die "IDEM_BIN='${IDEM_BIN:-}' is not an executable (set both IDEM_BIN and BARE_BIN)"
        [[ -x ${BARE_BIN:-} ]] || die "BARE_BIN='${BARE_BIN:-}' is not an executable (set both IDEM_BIN and BARE_BIN)"
        return 0
    fi
    [[ ${SKIP_BUILD:-0} == 1 ]] || release_build --bin idem --example "$1"
    IDEM_BIN=$(cargo_target_dir)/release/idem
    BARE_BIN=$(cargo_target_dir)/release/examples/$1
    [[ -x $IDEM_BIN ]] || die "$IDEM_BIN does not exist"
    [[ -x $BARE_BIN ]] || die "$BARE_BIN does not exist"
}

# make_tmp PREFIX [WHAT]: sets TMP to a new directory, removed on exit with every process
# started by `start` (kept with KEEP_TMP=1 or when the script fails; the message then says
# "WHAT kept in …", WHAT by default "logs and databases").
make_tmp() {
    TMP=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/$1.XXXXXX")
    chmod 755 "$TMP" # nginx workers drop privileges when started as root
    TMP_KEPT=${2:-logs and databases}
    PIDS=()
    PID_NAMES=()
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

cleanup() {
    local rc=$? i pid
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        [[ -z ${PIDS[i]} ]] || kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for i in "${!PIDS[@]}"; do
        pid=${PIDS[i]}
        [[ -n $pid ]] || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "${PID_NAMES[i]} (pid $pid) did not stop after SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if declare -F extra_cleanup >/dev/null; then extra_cleanup || true; fi
    if [[ ${KEEP_TMP:-0} == 1 || $rc -ne 0 ]]; then
        log "$TMP_KEPT kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}

# Ports handed out so far (two servers must not get the same one before either binds).
TAKEN=" "
# free_port VAR: a port nothing listens on, outside the usual ephemeral range.
free_port() {
    local p
    for _ in $(seq 500); do
        p=$((20000 + RANDOM % 12000))
        [[ $TAKEN == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            TAKEN+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "found no free port"
}

# start NAME CMD...: runs CMD in the background, output in $TMP/NAME.{out,err}; its pid in
# LAST_PID.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" </dev/null &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    PID_NAMES+=("$name")
}

# cpu_ticks PID...: utime+stime of the processes (every thread), in clock ticks of TICK
# per second (a process gone counts 0).
cpu_ticks() {
    local total=0 pid fields
    for pid in "$@"; do
        fields=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        fields=${fields##*) }
        read -r -a f <<<"$fields"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
TICK=$(getconf CLK_TCK)

# children_cpu_us VAR: sets VAR to the CPU time (user + system) of every child this shell
# has waited for, in microseconds, from the `times` builtin (run in this shell, not in a
# subshell, which has children of its own): around a foreground command, its cost.
children_cpu_us() {
    local line
    times >"$TMP/.times"
    line=$(sed -n 2p "$TMP/.times")
    printf -v "$1" '%s' "$(awk -v l="$line" 'BEGIN {
        n = split(l, t, " "); total = 0
        for (i = 1; i <= n; i++) { split(t[i], p, "m"); sub("s", "", p[2]); total += p[1] * 60 + p[2] }
        printf "%.0f", total * 1e6 }')"
}

# store_server_pids STORE REDIS_URL: the store server's processes (redis-server, every
# postgres process), whose CPU a request also costs; none for the embedded stores.
store_server_pids() {
    case $1 in
    redis) redis-cli -u "$2" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p' ;;
    postgres) pgrep -x postgres || true ;;
    esac
}

# tree_pids PID: PID and its children (an nginx master and its workers).
tree_pids() {
    echo "$1"
    pgrep -P "$1" 2>/dev/null || true
}

# pid_of NAME: the pid of the process `start` named NAME ("" when none).
pid_of() {
    local i
    for i in "${!PID_NAMES[@]}"; do
        [[ ${PID_NAMES[i]} == "$1" ]] && { echo "${PIDS[i]}"; return 0; }
    done
    return 0
}

# forget_pid PID: a process the script stopped itself, no longer cleanup's to stop.
forget_pid() {
    local i
    for i in "${!PIDS[@]}"; do
        [[ ${PIDS[i]} == "$1" ]] && PIDS[i]=""
    done
    return 0
}

# show_files FILE...: the tail of each file that is not empty.
show_files() {
    local f
    for f in "$@"; do
        [[ -s $f ]] && { log "--- $f (tail)"; tail -n 20 "$f" >&2; }
    done
    return 0
}

# show_logs NAME: the tail of the output and error log of the process `start` named NAME.
show_logs() {
    show_files "$TMP/$1.out" "$TMP/$1.err" "$TMP/$1.error.log"
}

# wait_port NAME PORT: until something accepts on PORT; fails if NAME's process exits.
wait_port() {
    local name=$1 port=$2 pid=${PIDS[${#PIDS[@]} - 1]}
    for _ in $(seq 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_logs "$name"
            die "$name exited during startup"
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    show_logs "$name"
    die "$name did not listen on 127.0.0.1:$port within 15 s"
}

render() { # TEMPLATE OUT KEY=VALUE...
    local template=$1 out=$2 expr=() kv
    shift 2
    for kv in "$@"; do
        expr+=(-e "s#@${kv%%=*}@#${kv#*=}#g")
    done
    sed "${expr[@]}" "$template" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then
        die "unrendered placeholder in $out"
    fi
}

# start_nginx_upstream [NAME [STATUS_PATH]]: the fast nginx upstream of
# bench/nginx/upstream.conf.in, started as NAME (default upstream; config $TMP/NAME.conf);
# with STATUS_PATH, a stub_status location there too, for nginx_requests. Sets UPSTREAM_PORT,
# UPSTREAM_URL, UPSTREAM_NAME and UPSTREAM_PID.
# shellcheck disable=SC2120 # the arguments are optional
start_nginx_upstream() {
    UPSTREAM_NAME=${1:-upstream}
    local status=${2:-} conf=$TMP/${1:-upstream}.conf
    free_port UPSTREAM_PORT
    render "$ROOT/bench/nginx/upstream.conf.in" "$conf" "TMP=$TMP" "PORT=$UPSTREAM_PORT"
    if [[ -n $status ]]; then
        sed -i "s#^\( *\)location / {#\1location = $status { stub_status; }\n\1location / {#" "$conf"
        grep -q stub_status "$conf" || die "could not add the stub_status location to the $UPSTREAM_NAME config"
    fi
    start "$UPSTREAM_NAME" "$(find_nginx)" -p "$TMP/" -c "$conf" -e "$TMP/$UPSTREAM_NAME.error.log"
    UPSTREAM_PID=$LAST_PID
    wait_port "$UPSTREAM_NAME" "$UPSTREAM_PORT"
    UPSTREAM_URL=http://127.0.0.1:$UPSTREAM_PORT
    UPSTREAM_STATUS_URL=$UPSTREAM_URL$status
}

# nginx_requests: the request counter of the upstream started with a STATUS_PATH, this
# request included.
nginx_requests() {
    curl -sS --max-time 10 "$UPSTREAM_STATUS_URL" | awk 'NR == 3 { print $3 }'
}

# check_counted_upstream URL BODY [CURL-ARG...]: the upstream answers a JSON POST of BODY to
# URL with 201, and nginx_requests counts one a request.
check_counted_upstream() {
    local url=$1 body=$2 code c1 c2
    shift 2
    code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
        "$@" --data-binary "$body" "$url")
    [[ $code == 201 ]] || die "the $UPSTREAM_NAME answered $code to a POST, not 201"
    c1=$(nginx_requests)
    c2=$(nginx_requests)
    [[ $c1 =~ ^[0-9]+$ && $((c2 - c1)) -eq 1 ]] || die "the $UPSTREAM_NAME's stub_status counter does not work ($c1, $c2)"
}

# upstream_alive: fails, with its logs, when the upstream nginx has exited.
upstream_alive() {
    kill -0 "$UPSTREAM_PID" 2>/dev/null || {
        show_logs "$UPSTREAM_NAME"
        die "the $UPSTREAM_NAME nginx died during the benchmark"
    }
}

# make_test_ca DIR: a private CA and a server certificate signed by it, made now with
# openssl (ECDSA P-256, valid 2 days): DIR/ca.pem (the CA, what SSL_CERT_FILE and
# proxy_ssl_trusted_certificate name), DIR/server.pem and DIR/server.key (the leaf, for
# DNS name localhost and IP 127.0.0.1, serverAuth only). The CA's key never leaves DIR.
make_test_ca() {
    local dir=$1
    mkdir -p "$dir"
    chmod 755 "$dir"
    (
        cd "$dir"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=idem bench test CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -addext "subjectKeyIdentifier=hash" -out ca.pem
        openssl ecparam -name prime256v1 -genkey -noout -out server.key
        openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" \
            "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 2 \
            -extfile server.ext -out server.pem
    ) >"$dir/openssl.log" 2>&1 || { show_files "$dir/openssl.log"; die "openssl could not make the test certificates"; }
    openssl verify -CAfile "$dir/ca.pem" "$dir/server.pem" >/dev/null 2>&1 || die "the test server certificate does not verify against its CA"
}

# cargo_target_dir: where release_build puts its binaries ($CARGO_TARGET_DIR, relative to
# ROOT when it is relative; ROOT/target without it).
cargo_target_dir() {
    local dir=${CARGO_TARGET_DIR:-target}
    [[ $dir == /* ]] || dir=$ROOT/$dir
    printf '%s\n' "$dir"
}
