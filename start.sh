#!/usr/bin/env bash
# Run, test or benchmark the chat backend.
#
#   ./start.sh dev            development server (python app.py), debug logging
#   ./start.sh prod           gunicorn with gevent workers (gunicorn.conf.py)
#   ./start.sh light          gunicorn with 2 gevent workers, for small deployments
#   ./start.sh test           the whole test suite (installs what it needs)
#   ./start.sh test URL       curl health and metrics checks against a running server
#   ./start.sh perf           the load benchmark, then its report (bench/results/)
#
# Each mode creates .venv and installs the dependencies when they are missing.
set -euo pipefail
cd "$(dirname "$0")"

MODE="${1:-dev}"
shift || true
VENV=".venv"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

find_python() {
    for candidate in python3.12 python3.11 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "Python 3.11 or newer is needed; install it (apt-get install python3 python3-venv)" >&2
    exit 1
}

# Install a requirements file once; reinstall only when the file changes.
install_requirements() {
    local file="$1" stamp
    stamp="$VENV/.installed-$(basename "$file")-$(sha256sum "$file" | cut -c1-16)"
    [ -f "$stamp" ] && return
    say "installing $file into $VENV"
    "$PY" -m pip install --disable-pip-version-check -q -r "$file"
    touch "$stamp"
}

ensure_venv() {
    if [ ! -x "$PY" ]; then
        say "creating $VENV"
        "$(find_python)" -m venv "$VENV"
        "$PY" -m pip install --disable-pip-version-check -q --upgrade pip
    fi
    install_requirements requirements.txt
}

# System packages the tests start for real: Redis, nginx, Chromium.
ensure_system_packages() {
    local missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing system packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    # policy-rc.d keeps Debian from starting nginx and redis as system services.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

export PYTHONUNBUFFERED=1

case "$MODE" in
    dev)
        ensure_venv
        export LOG_LEVEL="${LOG_LEVEL:-DEBUG}"
        say "development server on http://${HOST:-0.0.0.0}:${PORT:-4343} (provider ${LLM_PROVIDER:-g4f}; database ${DATABASE_URL:-embedded in ${DATA_DIR:-./data}})"
        exec "$PY" app.py
        ;;
    prod)
        ensure_venv
        say "gunicorn (gevent) on ${HOST:-0.0.0.0}:${PORT:-4343}, ${WEB_CONCURRENCY:-$(nproc)} workers"
        exec "$VENV/bin/gunicorn" -c gunicorn.conf.py app:app
        ;;
    light)
        ensure_venv
        export WEB_CONCURRENCY=2
        say "gunicorn (gevent, light) on ${HOST:-0.0.0.0}:${PORT:-4343}, 2 workers"
        exec "$VENV/bin/gunicorn" -c gunicorn.conf.py app:app
        ;;
    test)
        case "${1:-}" in
            http://* | https://*)
                exec bash bench/smoke.sh "$1"
                ;;
        esac
        ensure_venv
        install_requirements requirements-dev.txt
        if [ "${CHAT_SKIP_LOCAL:-0}" != "1" ]; then
            install_requirements requirements-local.txt
        fi
        ensure_system_packages
        say "running the test suite"
        exec "$PY" -m pytest "$@"
        ;;
    perf)
        ensure_venv
        install_requirements requirements-dev.txt
        say "running the load benchmark (loopback only, bounded)"
        exec "$PY" -m bench.run "$@"
        ;;
    *)
        echo "usage: $0 {dev|prod|light|test [URL]|perf}" >&2
        exit 2
        ;;
esac
