#!/usr/bin/env bash
# MLflow tracking server of a smear-sweep cluster: runs on the Ray head node, next to the job driver.
#
#   docker/mlflow-server.sh            # foreground; the cluster YAML starts it with nohup in the background
#
# Storage: a SQL backend (sqlite on the head's disk by default; PostgreSQL for anything that must outlive
# the head) and an artifact store served through the server (a local folder by default, or s3://...), so
# workers need no bucket credentials. Security: MLflow's basic-auth app, bound to one private address
# (never 0.0.0.0); reach the UI from a laptop through an SSH tunnel (docs/cluster.md).
#
# Settings (environment):
#   MLFLOW_HOME                  persistent folder for the sqlite files, artifacts, pid and auth ini
#                                (default ~/mlflow; the cluster YAML bind-mounts the head's disk there)
#   MLFLOW_HOST                  address to bind (default: this node's private address, `hostname -I`)
#   MLFLOW_PORT                  port (default 5000)
#   MLFLOW_WORKERS               server worker processes (default 4)
#   MLFLOW_BACKEND_STORE_URI     default sqlite:///$MLFLOW_HOME/mlflow.db, e.g.
#                                postgresql://mlflow@db.internal:5432/mlflow (password in ~/.pgpass)
#   MLFLOW_ARTIFACTS_DESTINATION default $MLFLOW_HOME/artifacts, e.g. s3://my-bucket/mlflow
#   MLFLOW_AUTH_DATABASE_URI     users and permissions, default sqlite:///$MLFLOW_HOME/basic_auth.db
#   MLFLOW_AUTH                  basic (default) or none; none is refused unless MLFLOW_HOST is loopback
#   SMEAR_SECRETS_DIR            default ~/.smear-secrets, holding (never in git, never in job env_vars):
#       mlflow-server.env   MLFLOW_FLASK_SERVER_SECRET_KEY=...  MLFLOW_AUTH_ADMIN_PASSWORD=...
#       mlflow.env          MLFLOW_TRACKING_USERNAME=...  MLFLOW_TRACKING_PASSWORD=...  (the account jobs
#                           log with; created here, or its password reset, once the server is up)
set -euo pipefail

MLFLOW_HOME=${MLFLOW_HOME:-$HOME/mlflow}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-4}
MLFLOW_AUTH=${MLFLOW_AUTH:-basic}
# MLflow's GenAI job runner (trace scoring; ~7 extra processes) is not used by training sweeps
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
SMEAR_SECRETS_DIR=${SMEAR_SECRETS_DIR:-$HOME/.smear-secrets}
if [[ -z "${MLFLOW_HOST:-}" ]]; then
    MLFLOW_HOST=$(hostname -I 2>/dev/null | awk '{print $1}')
fi
MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_HOME/mlflow.db}
MLFLOW_ARTIFACTS_DESTINATION=${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_HOME/artifacts}
MLFLOW_AUTH_DATABASE_URI=${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$MLFLOW_HOME/basic_auth.db}

die() { echo "mlflow-server.sh: $*" >&2; exit 1; }

case "$MLFLOW_HOST" in
    "") die "no private address found: set MLFLOW_HOST" ;;
    0.0.0.0 | "::" | "[::]" | "*") die "refusing to bind $MLFLOW_HOST: bind the head's private address (MLFLOW_HOST)" ;;
esac
loopback=false
case "$MLFLOW_HOST" in 127.* | localhost | "::1") loopback=true ;; esac
case "$MLFLOW_AUTH" in
    basic) ;;
    none) $loopback || die "MLFLOW_AUTH=none is only allowed on a loopback address, not $MLFLOW_HOST" ;;
    *) die "MLFLOW_AUTH must be basic or none, not '$MLFLOW_AUTH'" ;;
esac

mkdir -p "$MLFLOW_HOME"
chmod 700 "$MLFLOW_HOME"
pidfile=$MLFLOW_HOME/server.pid
# (a pid file left by an earlier container may name an unrelated process: check that it is mlflow)
if [[ -f "$pidfile" ]] && grep -qs mlflow "/proc/$(cat "$pidfile")/cmdline"; then
    echo "mlflow-server.sh: already running (pid $(cat "$pidfile")); nothing to do"
    exit 0
fi

args=(--backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
      --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS")

if [[ "$MLFLOW_AUTH" == basic ]]; then
    [[ -f "$SMEAR_SECRETS_DIR/mlflow-server.env" ]] || die "missing $SMEAR_SECRETS_DIR/mlflow-server.env (docs/cluster.md)"
    set -a
    # shellcheck source=/dev/null
    . "$SMEAR_SECRETS_DIR/mlflow-server.env"
    set +a
    [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] || die "MLFLOW_FLASK_SERVER_SECRET_KEY is not set"
    [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] || die "MLFLOW_AUTH_ADMIN_PASSWORD is not set"
    export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
    # MLflow's bundled basic_auth.ini keeps its user store in ./basic_auth.db (relative to the working
    # directory): write our own, with the store on the persistent disk.
    export MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_HOME/basic_auth.ini
    cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = READ
database_uri = $MLFLOW_AUTH_DATABASE_URI
admin_username = $MLFLOW_AUTH_ADMIN_USERNAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
# every trial logs through its own requests: check each password once a minute, not on every call
auth_cache_ttl_seconds = 60
EOF
    args+=(--app-name basic-auth)
fi

# The job account, created (or its password reset) by the admin once the server answers.
ensure_job_user() {
    [[ "$MLFLOW_AUTH" == basic && -f "$SMEAR_SECRETS_DIR/mlflow.env" ]] || return 0
    (
        set -a
        # shellcheck source=/dev/null
        . "$SMEAR_SECRETS_DIR/mlflow.env"
        set +a
        MLFLOW_URL="http://$MLFLOW_HOST:$MLFLOW_PORT" python - <<'EOF'
import base64, json, os, time, urllib.error, urllib.request

url, user, pw = os.environ["MLFLOW_URL"], os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
admin = base64.b64encode(f"{os.environ['MLFLOW_AUTH_ADMIN_USERNAME']}:{os.environ['MLFLOW_AUTH_ADMIN_PASSWORD']}".encode()).decode()


def call(method, path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), method=method, headers={
        "Authorization": f"Basic {admin}", "Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=30)


try:
    call("POST", "/api/2.0/mlflow/users/create", {"username": user, "password": pw})
    print(f"mlflow-server.sh: created user {user!r}")
except urllib.error.HTTPError as e:
    if "already exists" not in e.read().decode(errors="replace").lower():
        raise
    call("PATCH", "/api/2.0/mlflow/users/update-password", {"username": user, "password": pw})
    print(f"mlflow-server.sh: user {user!r} exists; password set from mlflow.env")
EOF
    )
}

mlflow server "${args[@]}" &
server=$!
echo "$server" > "$pidfile"
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" || true; rm -f "$pidfile"' EXIT
trap 'exit 143' TERM INT

for _ in $(seq 1 120); do  # /health needs no credentials
    kill -0 "$server" 2>/dev/null || die "mlflow server exited"
    if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://$MLFLOW_HOST:$MLFLOW_PORT/health" 2>/dev/null; then
        break
    fi
    sleep 1
done
kill -0 "$server" 2>/dev/null || die "mlflow server exited"
ensure_job_user
echo "mlflow-server.sh: serving http://$MLFLOW_HOST:$MLFLOW_PORT (auth: $MLFLOW_AUTH, backend: ${MLFLOW_BACKEND_STORE_URI%%://*})"
wait "$server"
