# Production image for the chat backend: gunicorn + gevent workers on port 4343.
#
#   docker build -t chat-backend .
#   docker run -p 4343:4343 -e DATABASE_URL=postgresql://... chat-backend
#
# Without DATABASE_URL the app starts its embedded PostgreSQL under DATA_DIR
# (/app/data); mount a volume there if that data should outlive the container.

# Python 3.12 on purpose: gevent's patch_all delivers run_in_executor results
# late on CPython 3.13.12+ and 3.14.3+ (gevent issue #2213). Both stages must use
# the same base so the venv's interpreter symlinks resolve in the final image.

# ---------------------------------------------------------------- builder ----
FROM python:3.12-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Only the requirements first, so code changes reuse the dependency layer.
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

# ------------------------------------------------------------------ final ----
FROM python:3.12-slim

ENV PATH=/opt/venv/bin:$PATH \
    PORT=4343 \
    DATA_DIR=/app/data \
    PYTHONUNBUFFERED=1

# A fixed uid/gid so Kubernetes' runAsNonRoot can verify it and volume
# permissions (fsGroup) are predictable. The home directory is writable:
# g4f keeps its cookies and caches under ~/.g4f.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app

WORKDIR /app

COPY --from=builder /opt/venv /opt/venv
COPY app.py gunicorn.conf.py ./
COPY chat/ ./chat/
COPY docker/entrypoint.sh ./docker/entrypoint.sh

# Code stays root-owned (read-only to the server); only DATA_DIR is the app's.
# Byte-compile now because the app user cannot write __pycache__ under /app.
RUN chmod 0755 docker/entrypoint.sh \
 && mkdir -p /app/data \
 && chown app:app /app/data \
 && python -m compileall -q app.py gunicorn.conf.py chat

USER 10001:10001

EXPOSE 4343

# Liveness only (process up and answering); readiness (database reachable) is
# for orchestrators, see /api/health/ready. slim has no curl: use urllib, which
# exits non-zero on a connection error, a timeout or a non-2xx status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=4)" \
        "http://127.0.0.1:${PORT:-4343}/api/health/live"

CMD ["/app/docker/entrypoint.sh"]
