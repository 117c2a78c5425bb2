#!/usr/bin/env bash
# The reliability suite at full size (docs/reliability.md has its figures): 30 kill -9 trials
# on 500 manifests, 10,000 bad-input cases, 10 minutes of load on 10,000 manifests, and the
# rest, and the HA failovers on PostgreSQL (tests/test_ha.py: 20 kill -9 trials on 200
# manifests, a 30 s database outage). Takes about 25 minutes on 2 cores. Prints one FIGURES
# line per scenario at the end.
# Replay a failure with the seed it printed: RELIABILITY_SEED=<seed> tests/reliability/run_full.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || { echo "run scripts/test once first (it creates .venv)"; exit 2; }
log=$(mktemp /tmp/reliability-full.XXXXXX)
RELIABILITY_FULL=1 .venv/bin/python -m pytest tests/reliability tests/test_ha.py -m "not quick" -q -s \
    -p no:cacheprovider --timeout 3600 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo
echo "== figures =="
grep -E "^(FIGURES|.*seed=)" "$log"
exit "$status"
