#!/usr/bin/env bash
# Create the cluster's secrets once, on your own machine, outside the repository:
#
#   docker/make-secrets.sh [DIR]        # default ~/.smear-sweep/secrets
#
# ray_cluster.yaml copies DIR to ~/.smear-secrets on every node (file_mounts). It holds:
#   ray_auth_token      Ray's token (RAY_AUTH_MODE=token): every node, and your `ray job submit`
#   mlflow.env          MLFLOW_TRACKING_USERNAME/PASSWORD, the account jobs log to MLflow with
#   mlflow-server.env   MLFLOW_FLASK_SERVER_SECRET_KEY and MLFLOW_AUTH_ADMIN_PASSWORD (the MLflow server)
# Existing files are kept (rotate a secret by deleting its file, then `ray up` again).
set -euo pipefail

dir=${1:-$HOME/.smear-sweep/secrets}
umask 077
probe=$dir
while [[ ! -d "$probe" ]]; do probe=$(dirname "$probe"); done
if git -C "$probe" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "make-secrets.sh: $dir is inside a git work tree; choose a folder outside any repository" >&2
    exit 1
fi
mkdir -p "$dir"
rand() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }

[[ -s "$dir/ray_auth_token" ]] || rand > "$dir/ray_auth_token"
[[ -s "$dir/mlflow.env" ]] || printf 'MLFLOW_TRACKING_USERNAME=smear-jobs\nMLFLOW_TRACKING_PASSWORD=%s\n' "$(rand)" > "$dir/mlflow.env"
[[ -s "$dir/mlflow-server.env" ]] || printf 'MLFLOW_FLASK_SERVER_SECRET_KEY=%s\nMLFLOW_AUTH_ADMIN_PASSWORD=%s\n' "$(rand)" "$(rand)" \
    > "$dir/mlflow-server.env"
chmod 700 "$dir"
chmod 600 "$dir"/*
echo "secrets in $dir:"
ls -l "$dir"
