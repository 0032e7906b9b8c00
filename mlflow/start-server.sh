#!/usr/bin/env bash
# Start the MLflow tracking server for genpipe: basic authentication on, proxied artifacts.
#
# Required:
#   MLFLOW_AUTH_ADMIN_PASSWORD      password of the admin user, used when the auth database is
#                                   first created (later changes: use the update-password API)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  secret for the auth app's sessions/CSRF (e.g. `openssl rand -hex 32`)
#
# Optional (defaults in brackets):
#   MLFLOW_HOME                     state directory [$HOME/.genpipe/mlflow-server]
#   MLFLOW_HOST                     interface to bind [127.0.0.1]
#   MLFLOW_PORT                     port [5000]
#   MLFLOW_WORKERS                  server worker processes [mlflow's default]
#   MLFLOW_BACKEND_STORE_URI        runs/registry store [sqlite:///$MLFLOW_HOME/mlflow.db]
#                                   or postgresql://USER@HOST:5432/DB (password via PGPASSWORD
#                                   or ~/.pgpass, never in the URI: it would show in `ps`)
#   MLFLOW_ARTIFACTS_DESTINATION    artifact store [$MLFLOW_HOME/artifacts]
#                                   or s3://BUCKET/PREFIX (with MLFLOW_S3_ENDPOINT_URL for
#                                   S3-compatible stores, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)
#   MLFLOW_AUTH_DATABASE_URI        users/permissions store [sqlite:///$MLFLOW_HOME/basic_auth.db]
#   MLFLOW_AUTH_ADMIN_USERNAME      admin user name [admin]
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a new user may do on others' experiments [READ]
#   MLFLOW_AUTH_CACHE_TTL_SECONDS   cache verified credentials this long per worker [0 = off];
#                                   each uncached request pays a PBKDF2 check (~0.5-1 s of CPU)
#   MLFLOW_AUTH_CONFIG_PATH         use this auth .ini instead of generating one
#   MLFLOW_ALLOWED_HOSTS            --allowed-hosts when serving beyond localhost
#   MLFLOW_BIN                      mlflow executable [mlflow on PATH]
# Any further arguments are passed to `mlflow server`.
set -euo pipefail

die() {
    printf 'start-server.sh: %s\n' "$*" >&2
    exit 2
}

[[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] ||
    die "MLFLOW_AUTH_ADMIN_PASSWORD is not set: basic auth needs an admin password (MLflow ships none). Export it (from a secret store, not the command line) and retry."
[[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] ||
    die "MLFLOW_FLASK_SERVER_SECRET_KEY is not set: export a random secret, e.g. MLFLOW_FLASK_SERVER_SECRET_KEY=\$(openssl rand -hex 32)."

mlflow_bin="${MLFLOW_BIN:-mlflow}"
command -v "$mlflow_bin" >/dev/null 2>&1 ||
    die "'$mlflow_bin' not found: install the project (pip install -e '.[dev]', which pulls mlflow[auth]) or set MLFLOW_BIN."

umask 077
home="${MLFLOW_HOME:-$HOME/.genpipe/mlflow-server}"
mkdir -p "$home"
home="$(cd "$home" && pwd -P)" # absolute: sqlite:/// URIs below need it

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
[[ "$port" =~ ^[0-9]+$ ]] || die "MLFLOW_PORT must be a number, got '$port'."
[[ "${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}" =~ ^[0-9]+$ ]] ||
    die "MLFLOW_AUTH_CACHE_TTL_SECONDS must be a whole number of seconds."
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$home/artifacts}"
auth_db="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$home/basic_auth.db}"

for uri in "$backend" "$auth_db"; do
    # scheme://user:password@host -> a password in the URI
    if [[ "$uri" =~ ^[a-z0-9+]+://[^/@]*:[^/@]*@ ]]; then
        die "a database URI contains a password; put it in PGPASSWORD or ~/.pgpass (PGPASSFILE) instead."
    fi
done
case "$artifacts" in
    s3://*) : ;; # credentials come from the AWS_* environment or an instance role
    *://*) : ;;
    *) mkdir -p "$artifacts" ;;
esac

if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
    # The admin password is deliberately not written here: it is read from the environment.
    MLFLOW_AUTH_CONFIG_PATH="$home/basic_auth.ini"
    cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $auth_db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}
EOF
fi
export MLFLOW_AUTH_CONFIG_PATH MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY

args=(
    server
    --app-name basic-auth
    --host "$host"
    --port "$port"
    --backend-store-uri "$backend"
    --serve-artifacts
    --artifacts-destination "$artifacts"
)
[[ -n "${MLFLOW_WORKERS:-}" ]] && args+=(--workers "$MLFLOW_WORKERS")
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

printf 'start-server.sh: MLflow on http://%s:%s (store %s, artifacts %s, auth config %s)\n' \
    "$host" "$port" "${backend%%://*}://…" "$artifacts" "$MLFLOW_AUTH_CONFIG_PATH" >&2
exec "$mlflow_bin" "${args[@]}" "$@"
