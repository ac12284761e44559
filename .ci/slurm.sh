# Sourced by .ci/run: slurm_up ACCOUNTING brings a single-node SLURM up (.ci/slurm-up.sh; ACCOUNTING=0: no
# slurmdbd, sacct fails, as on many clusters) and slurm_down stops exactly the daemons it started
# (.ci/slurm-down.sh stops the PIDs slurm-up.sh recorded); an EXIT trap calls slurm_down whatever happens.
# Where SLURM cannot start here, slurm_up says why and returns 0: the tests that need SLURM skip themselves
# with the reason. Where a controller already answers, it is used as it is and left running.
SLURM_CI_STARTED=0

slurm_down() {
    if [ "$SLURM_CI_STARTED" = 1 ]; then
        bash .ci/slurm-down.sh
        SLURM_CI_STARTED=0
    fi
}

slurm_up() {
    local accounting=$1 begin log pkgs reason=""
    begin=$(date +%s)
    log=$(mktemp)
    trap slurm_down EXIT
    if command -v sinfo >/dev/null && sinfo >/dev/null 2>&1; then
        echo "SLURM: a controller already answers; using it as it is"
        rm -f "$log"
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        reason="starting it needs root and apt-get"
    else
        pkgs="slurm-wlm munge"
        [ "$accounting" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
        # shellcheck disable=SC2086
        dpkg -s $pkgs >/dev/null 2>&1 || apt-get update -qq >>"$log" 2>&1 || true
        SLURM_CI_STARTED=1
        if ACCOUNTING=$accounting bash .ci/slurm-up.sh >>"$log" 2>&1; then
            echo "SLURM up (ACCOUNTING=$accounting) in $(( $(date +%s) - begin )) s"
        else
            reason="slurm-up.sh failed: $(grep -v '^[[:space:]]*$' "$log" | tail -1)"
            slurm_down
        fi
    fi
    [ -n "$reason" ] && echo "SLURM did not start ($reason): the tests that need it are skipped"
    rm -f "$log"
    return 0
}
