#!/usr/bin/env bash
# Runs a command with a single-node SLURM up, then stops exactly the daemons the bring-up started
# (.ci/slurm-down.sh stops the PIDs .ci/slurm-up.sh recorded), whatever the command's exit status.
# Usage: ACCOUNTING=1|0 bash .ci/with-slurm.sh COMMAND...   (0: no slurmdbd, sacct fails, as on many clusters)
# Where SLURM cannot start here, the command still runs and the cluster tests skip themselves with the reason;
# where a SLURM controller already answers, it is used as it is and left running.
set -uo pipefail
cd "$(dirname "$0")/.."
export ACCOUNTING=${ACCOUNTING:-1}
log=$(mktemp)
started=0
stop() {
    [ "$started" = 1 ] && bash .ci/slurm-down.sh
    rm -f "$log"
}
trap stop EXIT
begin=$(date +%s)
reason=""
if command -v sinfo >/dev/null && sinfo >/dev/null 2>&1; then
    echo "SLURM: a controller already answers; using it as it is"
elif [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    reason="starting it needs root and apt-get"
else
    pkgs="slurm-wlm munge"
    [ "$ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
    # shellcheck disable=SC2086
    dpkg -s $pkgs >/dev/null 2>&1 || apt-get update -qq >>"$log" 2>&1
    started=1
    if bash .ci/slurm-up.sh >>"$log" 2>&1; then
        echo "SLURM up (ACCOUNTING=$ACCOUNTING) in $(( $(date +%s) - begin )) s"
    else
        reason="slurm-up.sh failed: $(grep -v '^\s*$' "$log" | tail -1)"
    fi
fi
[ -n "$reason" ] && echo "SLURM did not start ($reason): the tests that need it are skipped"
"$@"
