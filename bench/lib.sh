# bench/lib.sh — shell helpers shared by the benchmark scripts: tools, the release build,
# background processes in a temporary directory and their cleanup, free ports, templates.
# Source it after setting SCRIPT (the script's name, for messages), ROOT and KEEP_TMP.

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
        command -v sudo >/dev/null 2>&1 || die "need ${missing[*]}; run as root or: apt-get install -y ${missing[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

# release_build CARGO-ARGS...: cargo build --release, --locked when Cargo.lock is tracked.
release_build() {
    local locked=()
    if git -C "$ROOT" ls-files --error-unmatch Cargo.lock >/dev/null 2>&1; then
        locked=(--locked)
    fi
    log "building: cargo build --release ${locked[*]} $*"
    (cd "$ROOT" && cargo build --release "${locked[@]}" "$@") >&2
}

# make_tmp PREFIX: sets TMP to a new directory, removed on exit with every process started
# by `start` (kept, logs and all, with KEEP_TMP=1 or when the script fails).
make_tmp() {
    TMP=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/$1.XXXXXX")
    chmod 755 "$TMP" # nginx workers drop privileges when started as root
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
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for i in "${!PIDS[@]}"; do
        pid=${PIDS[i]}
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
        log "logs and databases kept in $TMP"
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

# start NAME CMD...: runs CMD in the background, output in $TMP/NAME.{out,err}.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" </dev/null &
    PIDS+=($!)
    PID_NAMES+=("$name")
}

show_logs() {
    local name=$1 f
    for f in "$TMP/$name.out" "$TMP/$name.err" "$TMP/$name.error.log"; do
        [[ -s $f ]] && { log "--- $f (tail)"; tail -n 20 "$f" >&2; }
    done
    return 0
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

# start_nginx_upstream: the fast nginx upstream of bench/nginx/upstream.conf.in; sets
# UPSTREAM_URL.
start_nginx_upstream() {
    local port
    free_port port
    render "$ROOT/bench/nginx/upstream.conf.in" "$TMP/upstream.conf" "TMP=$TMP" "PORT=$port"
    start upstream "$(find_nginx)" -p "$TMP/" -c "$TMP/upstream.conf" -e "$TMP/upstream.error.log"
    wait_port upstream "$port"
    UPSTREAM_URL=http://127.0.0.1:$port
}
