#!/usr/bin/env bash
# Check a running server with curl: health, readiness, metrics. Exit 1 when unhealthy.
set -uo pipefail
BASE="${1%/}"
failures=0

check() {
    local name="$1" path="$2" expect="$3" body code
    body=$(curl -sS --max-time 5 -w '\n%{http_code} %{time_total}' "$BASE$path" 2>&1)
    code=$(tail -n1 <<<"$body")
    body=$(sed '$d' <<<"$body")
    if [[ "${code%% *}" == "200" ]] && grep -q -- "$expect" <<<"$body"; then
        printf 'ok    %-22s %s in %ss\n' "$name" "${code%% *}" "${code##* }"
    else
        printf 'FAIL  %-22s %s\n' "$name" "${code%% *}"
        printf '      %s\n' "$(head -c 400 <<<"$body")"
        failures=$((failures + 1))
    fi
}

echo "checking $BASE"
check "health"           /api/health        '"status"'
check "health/live"      /api/health/live   'alive'
check "health/ready"     /api/health/ready  'ready'
check "metrics (json)"   /api/metrics       '"requests"'
check "metrics (prom)"   /metrics           'chat_http_requests_total'
check "models"           /v1/models         '"object":"list"'
status=$(curl -sS --max-time 5 "$BASE/api/health" 2>/dev/null | grep -o '"status":"[a-z]*"' | head -n1)
echo "server status: ${status:-unreachable}"
if [ "$failures" -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all checks passed"
