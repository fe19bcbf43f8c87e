"""infra/: every manifest and cluster config parses and carries what a deployment needs, and the
pieces agree with each other and with the code (image, entrypoint, config path, custom
resources, GPUs, autoscaling, Secrets). Offline: Ray's own KubeRay translation, launcher
config preparation and JSON schema stand in for a cluster; no Docker or Kubernetes here."""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from importlib.metadata import requires, version
from pathlib import Path

import pytest
import yaml

from zeus_ray.config import load_config
from zeus_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
LAUNCHERS = {"aws": INFRA / "aws-cluster.yaml", "gcp": INFRA / "gcp-cluster.yaml"}
ENTRY_SCRIPT = "jobs/segment_cohort.py"
SECRET_PATTERNS = {   # shapes of real credentials that must never be committed
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": r"\"private_key_id\"\s*:",
}


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def _k8s() -> dict[str, dict]:
    """kind -> the one object of that kind under infra/k8s."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for d in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), path
            assert d["kind"] not in out, f"two {d['kind']} objects"
            out[d["kind"]] = d
    return out


def _walk(node, key=None):
    """Yield (key, value) for every mapping entry in a nested structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _pod_specs(obj) -> list[dict]:
    """Every pod spec in an object (head/worker templates, submitters, CronJob pods)."""
    return [v["spec"] for k, v in _walk(obj) if k in ("template", "submitterPodTemplate")
            and isinstance(v, dict) and "containers" in v.get("spec", {})]


def _dockerfile() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _image_path(path: str) -> Path:
    """A path inside the image -> the repository file it was copied from (WORKDIR /app)."""
    workdir = [arg for ins, arg in _dockerfile() if ins == "WORKDIR"][-1]
    assert path.startswith(workdir + "/"), f"{path} is not under the image's {workdir}"
    return ROOT / path[len(workdir) + 1:]


def _parse_resources(value: str) -> dict:
    """What `ray start --resources=VALUE` accepts (Ray's own parser; it aborts on bad JSON)."""
    from ray._private.utils import parse_resources_json
    from ray.autoscaler._private.cli_logger import cf, cli_logger
    return parse_resources_json(value, cli_logger, cf)


def _ray_start_resources(group: dict) -> dict:
    """KubeRay's rayStartParams.resources, '"{\\"reader\\": 100}"', as the shell hands it to
    `ray start --resources=...` in the pod's start command."""
    (arg,) = shlex.split("--resources=" + group["rayStartParams"]["resources"])
    return _parse_resources(arg.split("=", 1)[1])


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return _k8s()


@pytest.fixture(scope="module")
def cluster(k8s) -> dict:
    return k8s["RayCluster"]


@pytest.fixture(scope="module")
def groups(cluster) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


@pytest.fixture(scope="module")
def job_cfg(k8s, tmp_path_factory):
    """The job config inside the ConfigMap, validated by the package's own loader."""
    path = tmp_path_factory.mktemp("cm") / "job.yaml"
    path.write_text(k8s["ConfigMap"]["data"]["job.yaml"])
    return load_config(path)


@pytest.fixture(scope="module")
def launchers() -> dict[str, dict]:
    return {name: _docs(path)[0] for name, path in LAUNCHERS.items()}


def test_every_yaml_parses_with_the_expected_api_versions(k8s):
    for path in INFRA.rglob("*.yaml"):
        _docs(path)
    expected = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1",
                "CronJob": "batch/v1", "ConfigMap": "v1", "ServiceAccount": "v1"}
    assert {k: v["apiVersion"] for k, v in k8s.items()} == expected


def test_one_image_everywhere_tagged_with_the_package_version(k8s, launchers):
    images = {v for obj in k8s.values() for k, v in _walk(obj) if k == "image"}
    images |= {cfg["docker"]["image"] for cfg in launchers.values()}
    assert len(images) == 1, images
    image = images.pop()
    assert image.rsplit(":", 1)[1] == version("zeus_ray")
    assert image in (INFRA / "README.md").read_text()


def test_dockerfile_builds_ray_260_with_the_pinned_requirements_as_non_root():
    from packaging.requirements import Requirement
    steps = _dockerfile()
    froms = [arg for ins, arg in steps if ins == "FROM"]
    assert froms == ["rayproject/ray:2.60.0-py311-gpu"]
    ray_req = next(Requirement(r) for r in requires("zeus_ray") if r.startswith("ray"))
    assert ray_req.specifier.contains(froms[0].split(":")[1].split("-")[0])
    runs = " ".join(arg for ins, arg in steps if ins == "RUN")
    assert "pip install -r requirements.txt" in runs
    pins = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("torch")]
    assert pins and "grep -E '^(torch|torchvision)=='" in runs   # the torch pins, first layer
    assert [arg for ins, arg in steps if ins == "USER"][-1].split(":")[0] not in ("root", "0")
    text = (INFRA / "Dockerfile").read_text()
    assert not re.search(r"snapshot_download|hf_hub_download|huggingface-cli|from_pretrained", text)
    assert "trust_remote_code=True" not in text
    env = " ".join(arg for ins, arg in steps if ins == "ENV")
    assert "HF_HOME=/home/ray/zeus-cache/" in env
    for ins, arg in steps:   # every COPY source exists in the repo
        if ins == "COPY":
            for src in [a for a in arg.split() if not a.startswith("--")][:-1]:
                assert (ROOT / src).exists(), src


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent folder counts."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = re.escape(pat.lstrip("!").rstrip("/")).replace(r"\*\*/", "(.*/)?")
        rx = rx.replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not neg
    return ignored


def test_dockerignore_sends_what_the_build_copies_and_nothing_else():
    patterns = [l.strip() for l in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for needed in ["requirements.txt", "pyproject.toml", "README.md", "zeus_ray/engine/driver.py",
                   ENTRY_SCRIPT, "prompts/ai4skin-leiomyoma.yaml", "configs/demo.yaml"]:
        assert not _docker_ignored(needed, patterns), needed
    for junk in [".venv/bin/python", ".git/HEAD", "demo_output/results/x.png", "tests/conftest.py",
                 "benchmarks/RESULTS.md", "zeus_ray/__pycache__/config.cpython-311.pyc",
                 "zeus_ray.egg-info/PKG-INFO"]:
        assert _docker_ignored(junk, patterns), junk


def test_cluster_groups_resources_gpus_and_autoscaling(cluster, groups):
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert set(groups) == {"reader", "encoder"}
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        assert g["maxReplicas"] > g["minReplicas"], f"{name}: nothing to autoscale"
    for pod in _pod_specs(cluster):
        res = pod["containers"][0]["resources"]
        assert {"cpu", "memory"} <= res["requests"].keys() and "memory" in res["limits"]
    enc = groups["encoder"]["template"]["spec"]["containers"][0]["resources"]
    assert enc["requests"]["nvidia.com/gpu"] == enc["limits"]["nvidia.com/gpu"] == 1
    rdr = groups["reader"]["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in k for k in {**rdr["requests"], **rdr["limits"]})
    # The job picks GPU encoders only if GPUs exist when it starts (zeus_ray.engine.shape).
    assert groups["encoder"]["minReplicas"] >= 1


def test_ray_autoscaler_reads_the_custom_and_gpu_resources(cluster):
    """Ray 2.60's own RayCluster -> autoscaler translation (validated against its schema)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    cr = copy.deepcopy(cluster)
    cr["metadata"]["namespace"] = "zeus"
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["reader"]["resources"]["reader"] == 100 and "GPU" not in types["reader"]["resources"]
    assert types["encoder"]["resources"]["encoder"] == 100 and types["encoder"]["resources"]["GPU"] == 1
    assert (types["encoder"]["min_workers"], types["encoder"]["max_workers"]) == (1, 4)


def test_rayjob_and_raycronjob_run_the_same_cluster_and_entrypoint(k8s, cluster):
    job, cron = k8s["RayJob"]["spec"], k8s["RayCronJob"]["spec"]["jobTemplate"]
    assert job["rayClusterSpec"] == cluster["spec"] == cron["rayClusterSpec"]
    assert job["entrypoint"] == cron["entrypoint"]
    for spec in (job, cron):
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        sub = spec["submitterPodTemplate"]["spec"]
        assert sub["restartPolicy"] == "Never" and sub["containers"][0]["resources"]["requests"]


def test_entrypoint_runs_the_repo_script_on_the_config_the_configmap_mounts(k8s, cluster):
    python, script, config = k8s["RayJob"]["spec"]["entrypoint"].split()
    assert python == "python" and _image_path(script) == ROOT / ENTRY_SCRIPT
    assert (ROOT / ENTRY_SCRIPT).is_file()
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    cm_volumes = {v["name"]: v["configMap"]["name"] for v in head["volumes"] if "configMap" in v}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    mount_dir, key = config.rsplit("/", 1)
    assert cm_volumes[mounts[mount_dir]] == k8s["ConfigMap"]["metadata"]["name"]
    assert key in k8s["ConfigMap"]["data"]


def test_configmap_job_config_is_valid_and_matches_the_cluster(job_cfg, groups, cluster, launchers):
    assert job_cfg == load_config(INFRA / "job.yaml")
    assert _ray_start_resources(groups["reader"]).keys() == job_cfg.ray.reader_resources.keys()
    assert _ray_start_resources(groups["encoder"]).keys() == job_cfg.ray.encoder_resources.keys()
    assert job_cfg.ray.encoders_max <= groups["encoder"]["maxReplicas"]
    reader_cpus = int(groups["reader"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert job_cfg.ray.num_readers <= reader_cpus * groups["reader"]["maxReplicas"]
    assert _image_path(job_cfg.prompts.file).is_file()
    reader_pod = groups["reader"]["template"]["spec"]
    cache_mount = next(m for m in reader_pod["containers"][0]["volumeMounts"] if m["name"] == "zeus-cache")
    assert job_cfg.cache.dir.startswith(cache_mount["mountPath"] + "/")
    size = next(v for v in reader_pod["volumes"] if v["name"] == "zeus-cache")["emptyDir"]["sizeLimit"]
    assert job_cfg.cache.max_gb < int(size.removesuffix("Gi"))
    for cfg in launchers.values():
        assert job_cfg.ray.encoders_max <= cfg["available_node_types"]["encoder"]["max_workers"]


def test_a_typo_in_the_configmap_config_is_caught(k8s, tmp_path):
    bad = yaml.safe_load(k8s["ConfigMap"]["data"]["job.yaml"])
    bad["ray"]["encoder_resource"] = bad["ray"].pop("encoder_resources")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"ray\.encoder_resource: unknown key"):
        load_config(tmp_path / "job.yaml")


def test_launcher_configs_pass_ray_preparation_and_match_kuberay(launchers, groups):
    from ray.autoscaler._private.util import prepare_config, validate_config
    for name, cfg in launchers.items():
        prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
        assert prepared["provider"]["type"] == name
        types = cfg["available_node_types"]
        assert set(types) == {"head", "reader", "encoder"} and cfg["head_node_type"] == "head"
        assert types["head"]["resources"]["CPU"] == 0
        for group in ("reader", "encoder"):
            res = types[group]["resources"]
            assert _parse_resources(json.dumps(res)) == res
            custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}
            assert custom == _ray_start_resources(groups[group]), (name, group)
            assert 0 <= types[group]["min_workers"] < types[group]["max_workers"]
        assert types["encoder"]["min_workers"] >= 1
        assert isinstance(cfg["setup_commands"], list) and cfg["setup_commands"]
        assert any("ray start --head" in c and "--autoscaling-config" in c for c in cfg["head_start_ray_commands"])
    aws = launchers["aws"]["available_node_types"]
    assert re.match(r"(g|p)\d", aws["encoder"]["node_config"]["InstanceType"])
    assert all(t["node_config"]["ImageId"] not in ("", "latest_dlami") for t in aws.values())
    gcp = launchers["gcp"]["available_node_types"]
    assert gcp["encoder"]["resources"]["GPU"] == gcp["encoder"]["node_config"]["guestAccelerators"][0]["acceleratorCount"]
    assert all("CPU" in t["resources"] for t in gcp.values())   # GCP does not detect them


def test_raycronjob_schedule_and_runs_that_cannot_overlap(k8s):
    spec = k8s["RayCronJob"]["spec"]
    minute, hour, *rest = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"]   # daily
    assert 0 < spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_cronjob_fallback_submits_to_the_head_service_with_the_token(k8s, cluster):
    cj = k8s["CronJob"]["spec"]
    assert len(cj["schedule"].split()) == 5 and cj["concurrencyPolicy"] == "Forbid"
    job = cj["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] < 24 * 3600
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_ADDRESS"]["value"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (cluster["spec"]["authOptions"]["secretName"], "auth_token")
    script = container["args"][0]
    assert 'ray job submit --address "$RAY_ADDRESS"' in script
    assert script.rstrip().endswith("-- " + k8s["RayJob"]["spec"]["entrypoint"])
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)   # shell syntax
    guard = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    compile(guard, "cronjob-guard", "exec")


def test_secrets_only_by_reference(k8s):
    assert "Secret" not in k8s
    referenced = set()
    for obj in k8s.values():
        for pod in _pod_specs(obj):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    if re.search(r"TOKEN|SECRET|KEY|PASSWORD", e["name"]) and e["name"] != "RAY_AUTH_MODE":
                        assert "value" not in e, f"{e['name']} is inline"
                        referenced.add(e["valueFrom"]["secretKeyRef"]["name"])
                referenced |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
    referenced.add(k8s["RayCluster"]["spec"]["authOptions"]["secretName"])
    assert referenced == {"zeus-ray-auth", "zeus-hf-token", "zeus-cloud-credentials"}
    readme = (INFRA / "README.md").read_text()
    for name in referenced:   # the README says how to create each
        assert f"create secret generic {name}" in readme, name
    for path in INFRA.rglob("*"):
        if path.is_file():
            for what, rx in SECRET_PATTERNS.items():
                assert not re.search(rx, path.read_text()), f"{path}: looks like a {what}"


def test_secret_scan_recognises_credential_shapes():
    """The patterns above do fire (fake values assembled here, never stored whole)."""
    samples = {"AWS access key id": "AKIA" + "ABCDEFGHIJKLMNOP", "Hugging Face token": "hf_" + "a1" * 17,
               "private key": "-----BEGIN RSA " + "PRIVATE KEY-----"}
    for what, text in samples.items():
        assert re.search(SECRET_PATTERNS[what], text), what


def test_every_pod_is_non_root_and_uses_an_existing_service_account(k8s):
    accounts = {k8s["ServiceAccount"]["metadata"]["name"]}
    for obj in k8s.values():
        for pod in _pod_specs(obj):
            assert pod["serviceAccountName"] in accounts
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["runAsNonRoot"] and sc["runAsUser"] != 0 and not sc["allowPrivilegeEscalation"]


def test_operator_values_enable_the_raycronjob_gate():
    values = _docs(INFRA / "helm" / "kuberay-operator-values.yaml")[0]
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates["RayCronJob"] is True


def test_readme_covers_every_file_and_the_commands():
    readme = (INFRA / "README.md").read_text()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(INFRA)) in readme, path
    for cmd in ["docker build -f infra/Dockerfile", "docker push", "helm install kuberay-operator",
                "kubectl -n zeus apply -f infra/k8s/raycluster.yaml", "ray job submit --working-dir .",
                "kubectl -n zeus apply -f infra/k8s/rayjob.yaml", "ray job logs -f", "kubectl -n zeus logs",
                "port-forward svc/zeus-head-svc 8265:8265", "RAY_AUTH_MODE=token",
                "--feature-gates=RayCronJob=true", "ray up infra/aws-cluster.yaml", "no Docker engine"]:
        assert cmd in readme, cmd


def test_every_cluster_runs_with_token_auth_and_the_token_from_a_secret(k8s, cluster, launchers):
    """Ray token authentication on every shipped cluster, the documented way. KubeRay: authOptions
    (mode token, the token from the Secret zeus-ray-auth, key auth_token; KubeRay then sets
    RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray container and RayJob submitter) on the RayCluster and
    on the clusters of the RayJob and RayCronJob, with an operator version that reads secretName.
    Launchers: the token file mounted on every node, every `ray start` with RAY_AUTH_MODE=token."""
    from ray.autoscaler._private.util import prepare_config
    specs = [cluster["spec"], k8s["RayJob"]["spec"]["rayClusterSpec"],
             k8s["RayCronJob"]["spec"]["jobTemplate"]["rayClusterSpec"]]
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token", "secretName": "zeus-ray-auth"}
        for pod in _pod_specs(spec):   # nothing overrides what KubeRay sets from the Secret
            names = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    readme = (INFRA / "README.md").read_text()
    assert "create secret generic zeus-ray-auth --from-literal=auth_token=" in readme
    values = (INFRA / "helm" / "kuberay-operator-values.yaml").read_text()
    chart = re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version (\d+)\.(\d+)\.(\d+)", values)
    assert chart and tuple(map(int, chart.groups())) >= (1, 6, 0)   # authOptions.secretName
    for name, cfg in launchers.items():
        mounts = prepare_config(copy.deepcopy(cfg))["file_mounts"]
        assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token", name
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [c for c in cfg[key] if "ray start" in c]
            assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), (name, key)
            for c in starts:
                subprocess.run(["bash", "-n"], input=c, text=True, check=True)
        assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"]), name
    assert "ray get-auth-token --generate" in readme
