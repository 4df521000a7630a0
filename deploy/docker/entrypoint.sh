#!/bin/sh
# One entry point for every sol image: `sol` subcommands by default, any other program
# (torchrun, python, sh) when named. tini (PID 1) forwards SIGTERM to whatever this execs,
# so the server's drain sees the signal directly.
set -eu

# Secrets arrive as files (compose secrets, Kubernetes secret volumes) so they stay out of
# `docker inspect` and the pod spec; VAR_FILE=/path exports VAR with the file's content.
for var in SOL_ADMIN_KEY SOL_KEY_PEPPER SOL_API_KEY SOL_REDIS_URL; do
    eval "file=\${${var}_FILE:-}"
    if [ -n "$file" ]; then
        if [ ! -r "$file" ]; then
            echo "sol-entrypoint: ${var}_FILE=$file is not readable" >&2
            exit 64
        fi
        value=$(cat "$file")
        export "$var=$value"
        unset "${var}_FILE"
    fi
done

case "${1:-}" in
    "")
        exec sol --help ;;
    torchrun|python|python3|sh|bash|sleep|sol|sol-healthcheck)
        exec "$@" ;;
    *)
        exec sol "$@" ;;
esac
