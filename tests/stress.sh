#!/usr/bin/env bash
# The whole suite under load: three runs in a row of `pytest -n 4` while two CPU
# hogs run beside it (stress-ng --cpu 2, installed with apt-get where it can be;
# else two `python3 -c 'while 1: pass'`), then one plain `pytest -n 2` (the
# README's command) without them. Run it from anywhere, with the README's .venv
# set up; extra arguments go to every pytest run (e.g. a test file, for a quick try).
#
# Prints one line per run: pytest's closing line, its exit code and the wall time.
# Exits 1 if any run failed (its log is kept, its path printed), 0 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || { echo "stress.sh: no $PYTHON: run the README's setup command first" >&2; exit 2; }

hogs=()
stop_hogs() {
    for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${hogs[@]}"; do wait "$pid" 2>/dev/null; done
    hogs=()
}
trap stop_hogs EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_hogs() {
    if ! command -v stress-ng >/dev/null && command -v apt-get >/dev/null \
            && [ "$(id -u)" = 0 ]; then
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stress-ng \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -qq stress-ng; }; } >/dev/null 2>&1
    fi
    if command -v stress-ng >/dev/null; then
        stress-ng --cpu 2 --quiet &
        hogs+=("$!")
        hog_kind="stress-ng --cpu 2"
    else
        for _ in 1 2; do
            python3 -c 'while 1: pass' &
            hogs+=("$!")
        done
        hog_kind="two python3 busy loops"
    fi
}

logs=$(mktemp -d "${TMPDIR:-/tmp}/hiocluster-stress.XXXXXX")
failed=0
run_suite() {  # label, pytest arguments...
    local label=$1 log="$logs/$1.log" started ended code closing
    shift
    started=$EPOCHREALTIME
    "$PYTHON" -m pytest "$@" >"$log" 2>&1
    code=$?
    ended=$EPOCHREALTIME
    closing=$(grep -E ' in [0-9.]+s' "$log" | grep -E 'passed|failed|error|no tests ran' \
              | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    printf '%s: %s; exit %d; wall %s s\n' "$label" "${closing:-no closing line}" "$code" \
        "$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.0f", b - a }')"
    if [ "$code" -ne 0 ]; then
        failed=1
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
        echo "    log: $log"
    else
        rm -f "$log"
    fi
}

start_hogs
echo "stress.sh: $(nproc) cores; hogs: $hog_kind (pids ${hogs[*]})"
for round in 1 2 3; do
    run_suite "n4-hogs-$round" -n 4 "$@"
done
stop_hogs
run_suite "n2-plain" -n 2 "$@"
[ "$failed" -eq 0 ] && rmdir "$logs" 2>/dev/null
exit "$failed"
