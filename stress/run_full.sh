#!/usr/bin/env bash
# The full-size reliability runs, one after the other (they share a small machine), each
# printing into stress/results/NAME.txt. About an hour on two cores. Run in the background:
#   nohup bash stress/run_full.sh > stress/results/run_full.log 2>&1 &
# Then copy the tables into stress/RESULTS.md.
set -u
cd "$(dirname "$0")/.."
mkdir -p stress/results
PY=${PY:-.venv/bin/python}
for script in ${STRESS_SCRIPTS:-kill_trials fuzz_api drop_proxy outage soak}; do
    echo "$(date -u '+%F %T') start $script"
    timeout 5400 "$PY" -m "stress.$script" > "stress/results/$script.txt" 2>&1
    rc=$?
    echo "$(date -u '+%F %T') end $script: exit $rc"
done
