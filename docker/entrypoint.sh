#!/bin/sh
# Container start: run gunicorn with the project's config (gevent workers).
# The app creates and migrates its schema itself at start, under an advisory
# lock, so several replicas may start at once. `exec` makes gunicorn PID 1:
# it receives SIGTERM from `docker stop` / the kubelet directly and shuts its
# workers down gracefully. Extra arguments are passed on to gunicorn.
set -eu

exec gunicorn -c gunicorn.conf.py "$@" app:app
