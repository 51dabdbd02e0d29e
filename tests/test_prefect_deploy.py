"""flows/prefect.yaml, infra/prefect/ (Kubernetes base job template, Helm values of the worker).

Fast: the deployments, their schedule and entrypoints; every job variable of a `singer-k8s` deployment is
declared by the base job template (Prefect drops undeclared ones silently); the template rendered with those
variables is a valid Kubernetes Job with the GPU limit; the worker's Helm values point at that pool.
Slow: `prefect deploy --all` against a real server creates all four deployments with their schedules; a process
worker (`prefect worker start --pool singer-process --run-once`) runs a `singer-pipeline` deployment run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import prefect_harness
import pytest
import yaml
from prefect_harness import client_env, kill_group, run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_YAML = ROOT / "flows" / "prefect.yaml"
TEMPLATE = ROOT / "infra" / "prefect" / "base-job-template.json"
WORKER_VALUES = ROOT / "infra" / "prefect" / "worker-values.yaml"
PROCESS_POOL, K8S_POOL = "singer-process", "singer-k8s"

prefect_server = prefect_harness.prefect_server


def _project() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _project()["deployments"]}


def _template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


def _walk(node: Any, path: str = ""):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


# ---------------------------------------------------------------------------------------- prefect.yaml


def test_deployments_and_schedules():
    project = _project()
    assert project["build"] is None and project["push"] is None  # the worker already holds the code
    deps = _deployments()
    assert set(deps) == {"singer-pipeline", "singer-retrain", "singer-pipeline-k8s", "singer-retrain-k8s"}
    assert {deps[n]["work_pool"]["name"] for n in ("singer-pipeline", "singer-retrain")} == {PROCESS_POOL}
    assert {deps[n]["work_pool"]["name"] for n in ("singer-pipeline-k8s", "singer-retrain-k8s")} == {K8S_POOL}
    weekly = deps["singer-retrain"]["schedules"][0]
    assert (weekly["cron"], weekly["active"]) == ("0 3 * * 1", True)
    assert deps["singer-retrain-k8s"]["schedules"][0]["active"] is False  # switched on where a k8s worker runs
    assert deps["singer-retrain"]["parameters"]["source"].startswith("s3://")
    for dep in deps.values():
        assert dep["concurrency_limit"]["limit"] == 1


def test_entrypoints_load_and_parameters_fit_the_flows(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # entrypoints are relative to the checkout the pull step enters
    names = {"flows/pipeline.py:pipeline": "singer-pipeline", "flows/retrain.py:retrain": "singer-retrain"}
    for dep in _deployments().values():
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        assert flow.name == names[dep["entrypoint"]]
        accepted = set(flow.parameters.properties)
        assert set(dep.get("parameters") or {}) <= accepted, (dep["name"], accepted)
        assert {"overrides", "target", "stages", "repo_dir"} <= accepted


def test_pull_steps_enter_the_checkout():
    import importlib

    project = _project()
    (step,) = project["pull"]
    (name, inputs), = step.items()
    module, func = name.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), func))  # a step Prefect can import
    assert inputs["directory"] == "{{ $SINGER_REPO_DIR }}"
    for dep in _deployments().values():
        if dep["work_pool"]["name"] == K8S_POOL:
            (k8s_step,) = dep["pull"]
            directory = k8s_step["prefect.deployments.steps.set_working_directory"]["directory"]
            assert directory == dep["work_pool"]["job_variables"]["repo_dir"]  # the checkout the job starts in


# ------------------------------------------------------------------------------ Kubernetes job template


def test_base_job_template_declares_every_k8s_job_variable():
    """Prefect drops job variables the work pool's template does not declare, without a word."""
    template = _template()
    declared = set(template["variables"]["properties"])
    placeholders = {m for _, v in _walk(template["job_configuration"]) if isinstance(v, str)
                    for m in re.findall(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", v)}
    assert placeholders <= declared, sorted(placeholders - declared)
    for dep in _deployments().values():
        if dep["work_pool"]["name"] == K8S_POOL:
            used = set(dep["work_pool"]["job_variables"])
            assert used <= declared, f"{dep['name']}: {sorted(used - declared)} not declared in {TEMPLATE.name}"
            assert {"image", "gpu_count", "namespace", "env"} <= used
    gpu = [v for path, v in _walk(template["job_configuration"]) if path.endswith("/limits/nvidia.com/gpu")]
    assert gpu == ["{{ gpu_count }}"]


def _render(job_variables: dict[str, Any]) -> dict[str, Any]:
    """What a Kubernetes worker builds for a flow run: defaults + job variables into the template, then the
    `env` variable prepended to the container's env list (prefect-kubernetes `_populate_env_in_manifest`)."""
    from prefect.utilities.templating import apply_values

    template = _template()
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(job_variables)
    config = apply_values(template["job_configuration"], values)
    manifest = config["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in (config.get("env") or {}).items()] + container["env"]
    container["args"] = ["python", "-m", "prefect.engine"]  # what the worker puts there when `command` is unset
    manifest["metadata"]["generateName"] = "singer-pipeline-"
    return manifest


def _validate(manifest: dict[str, Any]) -> None:
    """kubernetes-validate, strict, except for one quirk of Prefect's: its Kubernetes worker requires
    `parallelism: 1` and `completions: 1` in the *pod* spec of the template (prefect-kubernetes
    `_get_base_job_manifest`), where Kubernetes does not know them and drops them with a warning."""
    import copy

    import kubernetes_validate  # the cluster extra, which make install installs: a missing one must fail
    manifest = copy.deepcopy(manifest)
    pod = manifest["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    kubernetes_validate.validate(manifest, "1.30", strict=True)


def test_rendered_job_is_valid_kubernetes_with_the_gpu_and_the_checkout():
    variables = dict(_deployments()["singer-pipeline-k8s"]["work_pool"]["job_variables"])
    manifest = _render(variables)
    _validate(manifest)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == variables["gpu_count"] >= 1
    assert container["image"] == variables["image"] and manifest["metadata"]["namespace"] == "singer"
    env = {e["name"]: e for e in container["env"]}
    assert env["SINGER_REPO_DIR"]["value"] == container["workingDir"] == variables["repo_dir"]
    assert env["RAY_ADDRESS"]["value"].startswith("ray://")  # target=cluster evaluates on Ray
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "singer-s3"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "singer-ray-auth"  # the Ray cluster's token
    assert {"configMapRef": {"name": "singer-config"}} in container["envFrom"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert claims["workspace"] == "singer-workspace" and mounts["workspace"] == "/workspace"
    assert variables["repo_dir"].startswith(mounts["workspace"] + "/")
    # without a GPU request the job still renders (a CPU-only run)
    _validate(_render({**variables, "gpu_count": 0}))


def test_worker_helm_values_serve_the_k8s_pool():
    values = yaml.safe_load(WORKER_VALUES.read_text())
    worker = values["worker"]
    assert worker["config"]["workPool"] == K8S_POOL and worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] == "selfHostedServer" or worker["apiConfig"] == "server"
    assert worker["serverApiConfig"]["apiUrl"].endswith("/api")
    assert worker["config"]["baseJobTemplate"]["existingConfigMapName"]
    # its image's Prefect is the lock's, like the flows' (tests/test_lock.py checks every file that names it)
    assert worker["image"]["prefectTag"].endswith("-python3.11-kubernetes")


# ------------------------------------------------------------------------------------ deploy and run


@pytest.fixture
def deploy_repo(tmp_path) -> Path:
    """A checkout with the real flows/ and params.yaml and a one-stage dvc.yaml (`split`, instant)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "split.py").write_text("import pathlib\npathlib.Path('split.txt').write_text('a b')\n")
    (repo / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          split:
            cmd: {sys.executable} split.py
            deps: [split.py]
            outs: [split.txt]
    """))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo


def _server_accepts_null_limits(api_url: str) -> str | None:
    """None if fine; else why `prefect deploy` will crash against this server (FastAPI >= 0.151)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{api_url}/work_pools/{PROCESS_POOL}/workers/filter", method="POST",
                                     data=json.dumps({"limit": None, "offset": None}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10).close()
        return None
    except urllib.error.HTTPError as exc:
        if exc.code != 422:
            raise
        import fastapi

        return (f"the Prefect {__import__('prefect').__version__} server, on FastAPI {fastapi.__version__}, answers "
                "422 to the `\"limit\": null` its own client sends (FastAPI >= 0.151 validates explicit nulls): "
                "`prefect deploy` creates the first deployment and then crashes, and every client read_* call "
                "without an explicit limit fails. Pin fastapi>=0.139,<0.151 in pyproject.toml.")


@pytest.mark.slow
def test_deploy_all_then_a_process_worker_runs_the_pipeline(prefect_server, deploy_repo, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**os.environ, **client_env(prefect_server, tmp_path / "prefect-home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # unset while deploying: Prefect 3.8 bakes `{{ $VAR }}` of a pull step into the deployment when the
    # variable is set at deploy time; unset, the placeholder stays and the worker's environment decides
    env.pop("SINGER_REPO_DIR", None)
    shutil.copytree(ROOT / "infra" / "prefect", deploy_repo / "infra" / "prefect")
    # the README's one-machine commands, in its order: the process pool only, then its two deployments by name
    run_cli(["work-pool", "create", PROCESS_POOL, "--type", "process"], deploy_repo, env)
    run_cli(["gcl", "create", "dvc-repo", "--limit", "1"], deploy_repo, env)
    problem = _server_accepts_null_limits(prefect_server.api_url)
    if problem:
        pytest.fail(problem)
    out = run_cli(["deploy", "--prefect-file", "flows/prefect.yaml", "--name", "singer-pipeline",
                   "--name", "singer-retrain"], deploy_repo, env).stdout
    assert out.count("successfully created") == 2, out
    # the cluster's: the Kubernetes pool with its base job template first, then every deployment
    run_cli(["work-pool", "create", K8S_POOL, "--type", "kubernetes", "--base-job-template",
             "infra/prefect/base-job-template.json"], deploy_repo, env)
    out = run_cli(["deploy", "--all", "--prefect-file", "flows/prefect.yaml"], deploy_repo, env).stdout
    assert out.count("successfully") >= 4 and "singer-retrain-k8s" in out, out

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}), \
            get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("singer-retrain/singer-retrain")
        (schedule,) = retrain.schedules
        assert schedule.schedule.cron == "0 3 * * 1" and schedule.active
        assert retrain.work_pool_name == PROCESS_POOL and retrain.parameters["source"].startswith("s3://")
        k8s = client.read_deployment_by_name("singer-pipeline/singer-pipeline-k8s")
        assert k8s.work_pool_name == K8S_POOL and k8s.job_variables["gpu_count"] == 1
        assert k8s.parameters == {"target": "cluster"}
        pipeline = client.read_deployment_by_name("singer-pipeline/singer-pipeline")
        assert pipeline.pull_steps == [{"flows.common.set_repo_dir": {"directory": "{{ $SINGER_REPO_DIR }}"}}]

    started = run_cli(["deployment", "run", "singer-pipeline/singer-pipeline", "-p", 'stages=["split"]'],
                      deploy_repo, env).stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
    # the worker runs in another folder: the deployment's pull step must take the flow run to the checkout
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", PROCESS_POOL, "--run-once"],
                              cwd=tmp_path, env={**env, "SINGER_REPO_DIR": str(deploy_repo)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        output, _ = worker.communicate(timeout=300)
    finally:
        kill_group(worker)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}), \
            get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{output[-5000:]}"
    assert "Deployment step 'set_repo_dir' completed successfully" in output
    assert (deploy_repo / "split.txt").read_text() == "a b" and (deploy_repo / "dvc.lock").exists()
