# scripts/bench/common.sh — sourced (not run) by scripts/bench/run-create, run-rbd, run-herd,
# run-rss and run-prune.
#
# Before sourcing, set `name` (the workload's name, for messages). Provides:
#   here, root          scripts/bench and the repository root
#   rounds              BENCH_ROUNDS (default 5), validated
#   log MSG             progress on stderr
#   need_tools T...     fails if a tool is missing; installs GNU time with apt-get if root
#   resolve_bin         sets `bin`: $IMGCACHE_BIN, or `cargo build --release --locked` of this tree
#   make_work NEED_GIB  sets `work`: a fresh temp dir under ${BENCH_DIR:-${TMPDIR:-/tmp}} with
#                       NEED_GIB free, removed at exit (with whatever `on_exit` adds)
#   export_facts        exports the BENCH_FACT_* machine facts read by benchlib.facts_table
#                       and PYTHONPATH for benchlib
# shellcheck shell=bash

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
rounds="${BENCH_ROUNDS:-5}"
log() { echo "${name:?set name before sourcing common.sh}: $*" >&2; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { log "BENCH_ROUNDS must be a positive integer"; exit 64; }

need_tools() {
    if [[ ! -x /usr/bin/time ]]; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            log "installing GNU time (/usr/bin/time)"
            apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >&2
        else
            log "/usr/bin/time (GNU time) is missing; install the 'time' package"; exit 1
        fi
    fi
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null || { log "$t not found"; exit 1; }
    done
}

resolve_bin() {
    if [[ -n "${IMGCACHE_BIN:-}" ]]; then
        bin=$IMGCACHE_BIN
    else
        log "cargo build --release --locked"
        (cd "$root" && cargo build --release --locked -q >&2)
        bin="$root/target/release/imgcache"
    fi
    [[ -x "$bin" ]] || { log "no imgcache binary at $bin"; exit 1; }
    bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
}

on_exit=()   # extra commands (strings) run at exit, before the work dir is removed
_common_cleanup() {
    local c
    for c in "${on_exit[@]}"; do eval "$c" >/dev/null 2>&1 || true; done
    [[ -n "${work:-}" ]] && rm -rf "$work"
}

make_work() {
    local parent="${BENCH_DIR:-${TMPDIR:-/tmp}}"
    mkdir -p "$parent"
    work=$(mktemp -d "$parent/imgcache-bench-$name.XXXXXX")
    work=$(cd "$work" && pwd -P)
    trap _common_cleanup EXIT
    trap 'exit 130' INT TERM HUP
    local need_kib=$(($1 * 1024 * 1024)) avail_kib
    avail_kib=$(df -Pk "$work" | awk 'NR==2 {print $4}')
    if ((avail_kib < need_kib)); then
        log "need ~$1 GiB free in $work, have $((avail_kib / 1024)) MiB (set BENCH_DIR)"; exit 1
    fi
}

export_facts() {
    local commit
    if [[ -n "${IMGCACHE_BIN:-}" ]]; then
        commit="${IMGCACHE_BIN_COMMIT:-unknown} (IMGCACHE_BIN=$bin)"
    else
        commit=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
        if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
            commit="$commit + uncommitted changes in src/"
        fi
    fi
    BENCH_FACT_DATE=$(date -u +%FT%TZ)
    BENCH_FACT_NPROC=$(nproc)
    BENCH_FACT_CPU=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    BENCH_FACT_MEM=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
    BENCH_FACT_KERNEL=$(uname -sr)
    BENCH_FACT_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
    BENCH_FACT_FS=$(df -PT "$work" | awk 'NR==2 {print $2 " on " $1 " (mounted at " $7 ")"}')
    BENCH_FACT_COMMIT=$commit
    BENCH_FACT_TOOLS="$(qemu-img --version | head -1); coreutils $(cp --version | head -1 | awk '{print $NF}'); $(python3 --version); bash $BASH_VERSION"
    export BENCH_FACT_DATE BENCH_FACT_NPROC BENCH_FACT_CPU BENCH_FACT_MEM BENCH_FACT_KERNEL \
        BENCH_FACT_LOAD BENCH_FACT_FS BENCH_FACT_COMMIT BENCH_FACT_TOOLS
    export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONDONTWRITEBYTECODE=1
}
