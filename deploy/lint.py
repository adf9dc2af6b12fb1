"""Checks for the deployment files that no off-the-shelf linter makes. Run by deploy/check.sh.

    python deploy/lint.py k8s RENDERED.yaml      schemas (built-in and custom) + cross-object rules
    python deploy/lint.py k8s-schema RENDERED.yaml   schemas only (for the base, which has no image)
    python deploy/lint.py names                  PromQL in rules/dashboard/autoscaler uses real metric names
    python deploy/lint.py dashboard FILE.json    Grafana dashboard structure
    python deploy/lint.py scrape [URL|FILE]      a running server's /metrics matches the contract
                                                 (not in check.sh: needs a server; default
                                                 http://127.0.0.1:8000/metrics)

Each prints one line per finding and exits 1 if there is any.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from urllib.parse import urlsplit

import yaml

DEPLOY = Path(__file__).resolve().parent

# ---------------------------------------------------------------- contract --
# The server's metrics (name -> labels), read from its one metrics module, so a metric added or renamed there is
# checked here without a copy to keep in step.
sys.path.insert(0, str(DEPLOY.parent))
from prometheus_client.metrics import MetricWrapperBase  # noqa: E402

from server.metrics import REJECT_REASONS, Metrics  # noqa: E402
from server.schemas import JobResponse  # noqa: E402
from server.service import ENDPOINTS as SERVED_ENDPOINTS  # noqa: E402
from server.settings import Settings  # noqa: E402


def _contract() -> tuple[dict[str, set[str]], set[str]]:
    """Every metric of server.metrics.Metrics as its exposed name -> label names, and the histograms' names."""
    metrics, histograms = {}, set()
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # prometheus_client keeps a metric's name, type and label names on the wrapper (no public accessor).
        name = metric._name + ("_total" if metric._type == "counter" else "")
        metrics[name] = set(metric._labelnames)
        if metric._type == "histogram":
            histograms.add(name)
    return metrics, histograms


METRICS, HISTOGRAMS = _contract()
REASONS = set(REJECT_REASONS)
ENDPOINTS = set(SERVED_ENDPOINTS)
# The softdimo_jobs* metrics label a job by its kind ("generate", "refine") and its final status ("succeeded", ...).
JOB_ENDPOINTS = set(typing.get_args(JobResponse.model_fields["endpoint"].annotation))
JOB_STATUSES = set(typing.get_args(JobResponse.model_fields["status"].annotation))
# Labels every scraped series can carry besides its own: Prometheus target
# labels, the ServiceMonitor's, and a histogram bucket's `le`.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "le"}

# Custom resources: kubernetes-validate has no schema for them (it only warns),
# so they are checked against models generated from the operators' CRDs.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("cloudcoil.models.prometheus_operator.v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"): ("cloudcoil.models.keda.v1alpha1", "ScaledObject"),
}
KUBE_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported (preStop sleep action) and newest known


class Findings:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.errors.append(message)
        return ok

    def finish(self, what: str) -> int:
        for e in self.errors:
            print(f"  - {e}")
        print(f"  {what}: {'FAILED, ' + str(len(self.errors)) + ' problem(s)' if self.errors else 'ok'}")
        return 1 if self.errors else 0


# --------------------------------------------------------------- manifests --
def custom_model_problems(doc: dict) -> list[str]:
    """Validate a custom resource against its CRD model: types, enums, required
    fields (pydantic, strict mode) and unknown fields (walked here, since the
    generated models accept and drop them, as a CRD's pruning would)."""
    import importlib

    from pydantic import BaseModel, ValidationError

    module, name = CUSTOM_KINDS[(doc["apiVersion"], doc["kind"])]
    model = getattr(importlib.import_module(module), name)
    problems = []
    try:
        model.model_validate_json(json.dumps(doc), strict=True)
    except ValidationError as e:
        for err in e.errors():
            problems.append(f"{'.'.join(map(str, err['loc']))}: {err['msg']}")

    def models_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    def containers_in(annotation, origin):
        return [a for a in [annotation, *typing.get_args(annotation)] if typing.get_origin(a) in origin]

    def walk(cls, data, path):
        if not isinstance(data, dict):
            return
        fields = {}
        for fname, field in cls.model_fields.items():
            fields[field.alias or fname] = field
        for key, value in data.items():
            field = fields.get(key)
            if field is None:
                problems.append(f"{path}{key}: unknown field for {cls.__name__}")
                continue
            visit(field.annotation, value, f"{path}{key}")

    def visit(annotation, value, path):
        if isinstance(value, dict):
            for sub in models_in(annotation):
                return walk(sub, value, path + ".")
            for d in containers_in(annotation, (dict,)):
                for k, v in value.items():
                    visit(typing.get_args(d)[1], v, f"{path}[{k}]")
        elif isinstance(value, list):
            for lst in containers_in(annotation, (list,)):
                for i, v in enumerate(value):
                    visit(typing.get_args(lst)[0], v, f"{path}[{i}]")

    walk(model, doc, "")
    return problems


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""


def hardened(pod_spec: dict, c: dict, f: Findings, cname: str) -> None:
    """The restricted Pod Security Standard and then some, for every container of every workload."""
    psc, csc = pod_spec.get("securityContext", {}), c.get("securityContext", {})
    f.check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cname}: runAsNonRoot must be true")
    f.check(csc.get("readOnlyRootFilesystem") is True, f"{cname}: readOnlyRootFilesystem must be true")
    f.check(csc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation must be false")
    f.check("ALL" in csc.get("capabilities", {}).get("drop", []), f"{cname}: must drop ALL capabilities")
    res = c.get("resources", {})
    for r in ("cpu", "memory"):
        f.check(r in res.get("requests", {}) and r in res.get("limits", {}), f"{cname}: needs {r} request and limit")
    tag = image_tag(c.get("image", ""))
    f.check(bool(tag) and tag != "latest", f"{cname}: image {c.get('image')!r} needs an explicit tag other than latest")


def in_cluster_redis(url: str, namespace: str, by_kind: dict[str, list[dict]], f: Findings) -> None:
    """A Redis URL naming a Service of these manifests: that Service leads to a StatefulSet whose data is on a
    PersistentVolumeClaim and whose config keeps an append-only file, so accepted jobs outlive a restart of Redis."""
    parsed = urlsplit(url)
    host, port = parsed.hostname or "", parsed.port or 6379
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    name = host.removesuffix(f".{namespace}.svc.cluster.local").removesuffix(f".{namespace}.svc")
    name = name.removesuffix(f".{namespace}")
    if "." in name or name not in services:
        print(f"  job store: Redis at {host}:{port}, outside these manifests (not checked)")
        return
    svc = services[name]
    f.check(
        any(p["port"] == port for p in svc["spec"].get("ports", [])),
        f"SOFTDIMO_REDIS_URL port {port}: not a port of Service {name}",
    )
    backing = [
        s for s in by_kind.get("StatefulSet", [])
        if labels_match(svc["spec"].get("selector", {}), s["spec"]["template"]["metadata"].get("labels", {}))
    ]  # fmt: skip
    if not f.check(len(backing) == 1, f"Service {name} (SOFTDIMO_REDIS_URL) should select one StatefulSet's pods"):
        return
    sts = backing[0]
    where = f"StatefulSet {sts['metadata']['name']}"
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    pod_spec = sts["spec"]["template"]["spec"]
    mounted = {m["name"] for c in pod_spec["containers"] for m in c.get("volumeMounts", [])}
    f.check(bool(claims & mounted), f"{where}: Redis data needs a mounted volumeClaimTemplate")
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in by_kind.get("ConfigMap", [])}
    # Redis's settings: its command line and the ConfigMaps it mounts (a redis.conf).
    config = "\n".join(
        [" ".join(c.get("command", []) + c.get("args", [])) for c in pod_spec["containers"]]
        + [
            text
            for v in pod_spec.get("volumes", [])
            if "configMap" in v
            for text in maps.get(v["configMap"]["name"], {}).values()
        ]
    )
    f.check(
        re.search(r"(^|--)appendonly\s+yes\b", config, re.M) is not None,
        f"{where}: Redis needs appendonly yes, or a restart loses accepted jobs",
    )
    policy_set = re.search(r"(?:^|--)maxmemory-policy\s+(\S+)", config, re.M)
    f.check(
        policy_set is None or policy_set.group(1) == "noeviction",
        f"{where}: Redis must not evict keys (maxmemory-policy noeviction): they are jobs",
    )
    for c in pod_spec["containers"]:
        hardened(pod_spec, c, f, f"{where} container {c['name']}")


def policy(docs: list[dict], f: Findings) -> None:
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def one(kind):
        items = by_kind.get(kind, [])
        f.check(len(items) == 1, f"expected exactly one {kind}, found {len(items)}")
        return items[0] if items else None

    dep, pdb = one("Deployment"), one("PodDisruptionBudget")
    mon, scaler = one("ServiceMonitor"), one("ScaledObject")
    if dep is None:
        return
    namespace = dep["metadata"].get("namespace")
    for d in docs:
        if d["kind"] != "Namespace":
            f.check(
                d["metadata"].get("namespace") == namespace,
                f"{d['kind']}/{d['metadata']['name']} is in namespace {d['metadata'].get('namespace')!r}, "
                f"the Deployment in {namespace!r}",
            )
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    # The server's Service, beside others (the job store's) that select other pods.
    serving = [s for s in by_kind.get("Service", []) if labels_match(s["spec"].get("selector", {}), pod_labels)]
    f.check(len(serving) == 1, f"expected exactly one Service selecting the server's pods, found {len(serving)}")
    svc = serving[0] if serving else None
    spec = pod["spec"]
    containers = spec["containers"]
    f.check(len(containers) == 1, "the pod should run exactly one container")
    c = containers[0]
    cname = f"container {c['name']}"

    # Settings the server reads, from the generated ConfigMap and plain env.
    settings: dict[str, str] = {}
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in by_kind.get("ConfigMap", [])}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        if f.check(ref in maps, f"{cname}: envFrom names ConfigMap {ref!r}, which is not in the manifests"):
            settings.update(maps[ref])
    settings.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})

    tag = image_tag(c.get("image", ""))

    # Port and probes.
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    f.check(ports.get("http") == 8000, f"{cname}: needs containerPort 8000 named http")

    def probe(kind, path):
        p = c.get(kind)
        if not f.check(p is not None, f"{cname}: missing {kind}"):
            return None
        get = p.get("httpGet", {})
        f.check(
            get.get("path") == path and get.get("port") in ("http", 8000),
            f"{cname}: {kind} should GET {path} on port http",
        )
        return p

    startup = probe("startupProbe", "/readyz")
    probe("readinessProbe", "/readyz")
    probe("livenessProbe", "/healthz")
    if startup:
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        f.check(budget >= 120, f"{cname}: startupProbe allows only {budget}s for loading and warm-up (want >= 120s)")

    # Shutdown: preStop sleep + drain must finish inside the grace period.
    grace = spec.get("terminationGracePeriodSeconds", 30)  # Kubernetes' own default
    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = pre.get("sleep", {}).get("seconds")
    if sleep is None:
        cmd = pre.get("exec", {}).get("command", [])
        sleep = int(cmd[-1]) if cmd and "sleep" in cmd[0] and cmd[-1].isdigit() else None
    if f.check(sleep is not None, f"{cname}: needs a preStop sleep so endpoints are removed before SIGTERM"):
        drain = float(settings.get("SOFTDIMO_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default))
        f.check(
            sleep + drain < grace,
            f"preStop sleep {sleep}s + drain {drain:g}s must be < terminationGracePeriodSeconds {grace}s",
        )

    # Security, resources and image.
    hardened(spec, c, f, cname)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    f.check(
        bool(tmp) and "emptyDir" in volumes.get(tmp[0]["name"], {}),
        f"{cname}: /tmp must be an emptyDir (the root filesystem is read-only)",
    )

    # Resources, and the device the server is told to use.
    res = c.get("resources", {})
    req, lim = res.get("requests", {}), res.get("limits", {})
    gpus = lim.get("nvidia.com/gpu")
    f.check(req.get("nvidia.com/gpu") == gpus, f"{cname}: nvidia.com/gpu request must equal its limit")
    device = settings.get("SOFTDIMO_DEVICE", Settings.model_fields["device"].default)
    if device == "cuda":
        f.check(gpus is not None and int(gpus) >= 1, "SOFTDIMO_DEVICE=cuda but no nvidia.com/gpu limit")
        f.check("cuda" in tag, f"SOFTDIMO_DEVICE=cuda with image tag {tag!r} (expected a CUDA image)")
    elif device == "cpu":
        f.check(gpus is None, "SOFTDIMO_DEVICE=cpu but the pod asks for a GPU")
        f.check("cpu" in tag, f"SOFTDIMO_DEVICE=cpu with image tag {tag!r} (expected the CPU image)")

    # Autoscaled: the Deployment must not pin a replica count.
    f.check("replicas" not in dep["spec"], "Deployment sets spec.replicas; the ScaledObject owns the count")

    # Jobs: replicas must share one store. SQLite is a file in each pod's /tmp emptyDir: a job would be known
    # only to the pod that took it, and gone with that pod.
    store = settings.get("SOFTDIMO_JOB_STORE", Settings.model_fields["job_store"].default)
    most = scaler["spec"].get("maxReplicaCount", 100) if scaler else 1  # KEDA's default maximum is 100
    f.check(
        store == "redis" or most <= 1,
        f"up to {most} replicas with SOFTDIMO_JOB_STORE={store}: each pod would keep its own jobs"
        " (use components/redis)",
    )
    if store == "redis":
        url = settings.get("SOFTDIMO_REDIS_URL")
        from_secret = [
            e for e in c.get("env", [])
            if e["name"] == "SOFTDIMO_REDIS_URL" and "secretKeyRef" in e.get("valueFrom", {})
        ]  # fmt: skip
        f.check(
            url is not None or bool(from_secret),
            "SOFTDIMO_JOB_STORE=redis without SOFTDIMO_REDIS_URL: the server would look for Redis on its own loopback",
        )
        for e in from_secret:
            f.check(
                e["valueFrom"]["secretKeyRef"].get("optional") is not True,
                "SOFTDIMO_REDIS_URL from an optional Secret: without it the server would look on its own loopback",
            )
        if url is not None and not from_secret:
            in_cluster_redis(url, namespace, by_kind, f)

    # Service -> pods, PDB -> pods.
    if svc:
        f.check(labels_match(svc["spec"].get("selector", {}), pod_labels), "Service selector does not match the pods")
        sports = {p.get("name"): p for p in svc["spec"].get("ports", [])}
        http = sports.get("http")
        f.check(
            http is not None and http["port"] == 80 and http.get("targetPort") in ("http", 8000),
            "Service needs port 80 named http targeting the container's http port",
        )
    if pdb:
        f.check(
            labels_match(pdb["spec"].get("selector", {}).get("matchLabels", {}), pod_labels),
            "PodDisruptionBudget selector does not match the pods",
        )

    # ServiceMonitor -> Service, and the server's `endpoint` label survives.
    if mon and svc:
        f.check(
            labels_match(mon["spec"].get("selector", {}).get("matchLabels", {}), svc["metadata"].get("labels", {})),
            "ServiceMonitor selector does not match the Service",
        )
        sports = {p.get("name") for p in svc["spec"].get("ports", [])}
        for ep in mon["spec"].get("endpoints", []):
            f.check(ep.get("port") in sports, f"ServiceMonitor endpoint port {ep.get('port')!r} is not a Service port")
            f.check(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor should scrape /metrics")
            restores = any(
                r.get("targetLabel") == "endpoint" and "exported_endpoint" in r.get("sourceLabels", [])
                for r in ep.get("metricRelabelings", [])
            )
            f.check(
                ep.get("honorLabels") is True or restores,
                "ServiceMonitor would rename the server's `endpoint` label to exported_endpoint "
                "(set honorLabels or relabel it back)",
            )
        if not mon["spec"].get("jobLabel"):
            job = svc["metadata"]["name"]
        else:
            job = svc["metadata"].get("labels", {}).get(mon["spec"]["jobLabel"], svc["metadata"]["name"])
    else:
        job = None

    # ScaledObject -> Deployment, and its query selects this deployment's series.
    if scaler:
        ref = scaler["spec"]["scaleTargetRef"]
        f.check(
            ref.get("name") == dep["metadata"]["name"] and ref.get("kind", "Deployment") == "Deployment",
            "ScaledObject does not target the Deployment",
        )
        lo, hi = scaler["spec"].get("minReplicaCount", 0), scaler["spec"].get("maxReplicaCount", 100)
        f.check(2 <= lo <= hi, f"ScaledObject replicas {lo}..{hi}: want at least 2 and min <= max")
        queries = [t["metadata"].get("query", "") for t in scaler["spec"]["triggers"] if t["type"] == "prometheus"]
        for series in ("softdimo_queue_depth", "softdimo_jobs_queued"):
            f.check(any(series in q for q in queries), f"the autoscaler needs a trigger on {series}")
        for t in scaler["spec"]["triggers"]:
            if t["type"] != "prometheus":
                continue
            q = t["metadata"].get("query", "")
            f.check(
                "softdimo_queue_depth" in q or "softdimo_jobs_queued" in q,
                f"autoscaler query should be on softdimo_queue_depth or softdimo_jobs_queued: {q}",
            )
            # Every pod reports the whole shared store's backlog: a sum would count it once per pod.
            f.check(
                "softdimo_jobs_queued" not in q or re.match(r"\s*max\b", q) is not None,
                f"autoscaler query on softdimo_jobs_queued must take the max over pods, not add them up: {q}",
            )
            f.check(
                f'namespace="{namespace}"' in q,
                f'autoscaler query must select namespace="{namespace}" (the manifests\' namespace): {q}',
            )
            if job:
                f.check(f'job="{job}"' in q, f'autoscaler query must select job="{job}" (the scrape job): {q}')
            f.check(float(t["metadata"].get("threshold", 0)) > 0, "autoscaler threshold must be > 0")


def cmd_k8s(path: str, schema_only: bool = False) -> int:
    f = Findings()
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    kinds = sorted({f"{d['kind']}" for d in docs})
    print(f"  {len(docs)} objects: {', '.join(kinds)}")

    custom = [d for d in docs if (d.get("apiVersion"), d.get("kind")) in CUSTOM_KINDS]
    custom_kinds = {d["kind"] for d in custom}
    for version in KUBE_VERSIONS:
        run = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, path],
            capture_output=True,
            text=True,
        )
        out = (run.stdout + run.stderr).strip()
        unknown = re.findall(r"Couldn't find schema for kind (\S+)", out)
        unexpected = sorted(set(unknown) - custom_kinds)
        f.check(run.returncode == 0, f"kubernetes-validate --strict -k {version}:\n{out}")
        f.check(
            not unexpected,
            f"kubernetes-validate -k {version} has no schema for {unexpected}, "
            "and no model is configured for them either",
        )
        if run.returncode == 0 and not unexpected:
            print(
                f"  kubernetes-validate --strict -k {version}: {len(docs) - len(custom)} built-in objects valid"
                f" (no schema, checked below: {', '.join(sorted(set(unknown))) or 'none'})"
            )

    try:
        for d in custom:
            problems = custom_model_problems(d)
            for p in problems:
                f.check(False, f"{d['kind']}/{d['metadata']['name']}: {p}")
            if not problems:
                print(f"  {d['kind']}/{d['metadata']['name']}: valid against the CRD model (strict, no unknown fields)")
    except ImportError as e:
        f.check(False, f"CRD models not installed ({e}); deploy/check.sh installs them")

    if f.errors:
        print("  cross-object checks skipped until the schema errors are fixed")
    elif not schema_only:
        policy(docs, f)
    return f.finish("manifests")


# -------------------------------------------------------------------- PromQL --
def promql_sources() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression the deployment uses."""
    out = []
    for rules in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(rules.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                out.append((f"{rules.name}:{name}", rule["expr"]))
    dash = json.loads((DEPLOY / "grafana" / "softdimo.json").read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((f"dashboard:{panel['title']}", t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"dashboard:${v['name']}", v["query"]["query"] if isinstance(v["query"], dict) else v["query"]))
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d and d.get("kind") == "ScaledObject":
                for t in d["spec"].get("triggers", []):
                    if "query" in t.get("metadata", {}):
                        out.append((str(path.relative_to(DEPLOY)), t["metadata"]["query"]))
    return out


def cmd_names() -> int:
    f = Findings()
    recorded = set()
    for rules in (DEPLOY / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(rules.read_text())["groups"]:
            recorded |= {r["record"] for r in group["rules"] if "record" in r}
    for name in recorded:
        f.check(
            re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name) is not None,
            f"recording rule {name} is not named level:metric:operations",
        )
    sources = promql_sources()
    for where, expr in sources:
        # Recording-rule references must exist.
        for ref in re.findall(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b", expr):
            f.check(ref in recorded, f"{where}: uses {ref}, which no recording rule defines")
        # Raw metrics must be in the contract, and their label matchers must be
        # labels the metric has.
        for m in re.finditer(r"(?<![:\w])(softdimo_[a-z_]+)(\{[^}]*\})?", expr):
            name, matchers = m.group(1), m.group(2) or ""
            base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in METRICS else name
            if not f.check(
                base in METRICS and (base == name or base in HISTOGRAMS),
                f"{where}: {name} is not a metric the server exports",
            ):
                continue
            allowed = METRICS[base] | TARGET_LABELS
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
                f.check(label in allowed, f"{where}: {name} has no label {label!r}")
        # Aggregations straight over one metric keep only labels it has.
        for m in re.finditer(r"by \(([^)]*)\) \((?:rate|increase)?\(?(softdimo_[a-z_]+)", expr):
            name = m.group(2)
            base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in METRICS else name
            for label in (x.strip() for x in m.group(1).split(",")):
                f.check(
                    base not in METRICS or label in METRICS[base] | TARGET_LABELS,
                    f"{where}: groups {name} by {label!r}, which it does not have",
                )
    print(f"  {len(sources)} expressions, {len(recorded)} recording rules, {len(METRICS)} contract metrics")
    return f.finish("metric and label names")


# ----------------------------------------------------------------- Grafana --
def cmd_dashboard(path: str) -> int:
    f = Findings()
    dash = json.loads(Path(path).read_text())  # raises on invalid JSON
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    f.check(
        ds.get("type") == "datasource" and ds.get("query") == "prometheus",
        "needs a Prometheus datasource variable named datasource",
    )
    f.check(bool(dash.get("uid")) and bool(dash.get("title")), "needs uid and title")
    ids = [p["id"] for p in dash["panels"]]
    f.check(len(ids) == len(set(ids)), "panel ids are not unique")
    n = 0
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        n += 1
        f.check(p.get("datasource", {}).get("uid") == "${datasource}", f"panel {p['title']!r} ignores $datasource")
        f.check(bool(p.get("targets")), f"panel {p['title']!r} has no queries")
        refs = [t["refId"] for t in p.get("targets", [])]
        f.check(len(refs) == len(set(refs)), f"panel {p['title']!r} repeats a refId")
        for t in p.get("targets", []):
            f.check(
                t.get("datasource", {}).get("uid") == "${datasource}",
                f"panel {p['title']!r} query {t['refId']} ignores $datasource",
            )
            for var in re.findall(r"\$(\w+)", t["expr"]):
                f.check(var in variables or var.startswith("__"), f"panel {p['title']!r} uses undefined ${var}")
        g = p["gridPos"]
        f.check(g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid")
    wanted = [
        "request_duration",
        "images_generated",
        "batch_size",
        "queue_depth",
        "queue_wait",
        "status",
        "rejected",
        "reward_gain",
        "inflight",
        "jobs_queued",
        "jobs_total",
    ]
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for w in wanted:
        f.check(w in exprs, f"no panel shows {w}")
    f.check(
        re.search(r"by \([^)]*\blane\b[^)]*\) \(rate\(softdimo_queue_wait_seconds", exprs) is not None,
        "no panel shows queue wait by lane",
    )
    print(f"  {n} panels, variables: {', '.join(variables)}")
    return f.finish("dashboard")


# ------------------------------------------------------------ live server --
def cmd_scrape(url: str) -> int:
    import os
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    f = Findings()
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url)
        if os.environ.get("SOFTDIMO_API_KEY"):
            request.add_header("Authorization", f"Bearer {os.environ['SOFTDIMO_API_KEY']}")
        text = urllib.request.urlopen(request, timeout=10).read().decode()
    else:  # a saved exposition
        text = Path(url).read_text()
    families = {fam.name: fam for fam in text_string_to_metric_families(text)}
    for name, labels in METRICS.items():
        family = name.removesuffix("_total")
        kind = "histogram" if name in HISTOGRAMS else "counter" if name.endswith("_total") else "gauge"
        fam = families.get(family)
        if not f.check(fam is not None, f"{name}: not exported"):
            continue
        f.check(fam.type == kind, f"{name}: type {fam.type}, expected {kind}")
        samples = [smp for smp in fam.samples if not smp.name.endswith("_created")]
        if not samples:
            print(f"  {name}: no samples yet (labels unchecked)")
        les = set()
        for smp in samples:
            got = set(smp.labels) - {"le"}
            f.check(got == labels, f"{name}: labels {sorted(got)}, expected {sorted(labels)}")
            if "le" in smp.labels and smp.labels["le"] != "+Inf":
                les.add(float(smp.labels["le"]))
            v = smp.labels
            f.check(v.get("reason", "queue_full") in REASONS, f"{name}: reason={v.get('reason')!r}")
            if name.startswith("softdimo_jobs"):
                f.check(v.get("endpoint", "generate") in JOB_ENDPOINTS, f"{name}: endpoint={v.get('endpoint')!r}")
                f.check(v.get("status", "succeeded") in JOB_STATUSES, f"{name}: status={v.get('status')!r}")
                continue
            f.check(v.get("endpoint", "/generate") in ENDPOINTS, f"{name}: endpoint={v.get('endpoint')!r}")
            f.check(v.get("status", "200").isdigit(), f"{name}: status={v.get('status')!r} is not an HTTP code")
        if name == "softdimo_request_duration_seconds" and les:
            f.check(max(les) >= 120, f"{name}: largest bucket {max(les):g}s, expected >= 120s")
    return f.finish(f"metrics at {url}")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "scrape" and len(argv) <= 2:
        return cmd_scrape(argv[1] if len(argv) == 2 else "http://127.0.0.1:8000/metrics")
    if len(argv) == 2 and argv[0] in ("k8s", "k8s-schema"):
        return cmd_k8s(argv[1], schema_only=argv[0] == "k8s-schema")
    if argv == ["names"]:
        return cmd_names()
    if len(argv) == 2 and argv[0] == "dashboard":
        return cmd_dashboard(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
