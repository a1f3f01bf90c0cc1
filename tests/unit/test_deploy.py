"""The deployment files, checked by the tools that consume them, offline.

- helm/inferlog: `helm lint` and `helm template` for the default values and each
  helm/inferlog/ci/*.yaml; every rendered object against the Kubernetes OpenAPI schemas
  (kubernetes-validate, bundled) and the custom resources against their CRDs' schemas;
  values.schema.json and the chart's guards reject bad values; each served model's workers,
  KEDA topics and group against the worker's own rule (inferlog/settings.py).
- docker-compose.yml against the Compose Specification schema (from compose-go, the
  loader of `docker compose`), plus the references the schema cannot see.
- The Grafana dashboard and the Prometheus config against the worker's metrics.

Helm, the compose schema and the CRDs come from .ci/tools/install-deploy-tools.sh (into
$INFERLOG_TOOLS_DIR, default .tools/). Without them these tests skip, unless
INFERLOG_REQUIRE_DEPLOY_TOOLS=1 (CI), where they fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "inferlog"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
TOOLS = Path(os.environ.get("INFERLOG_TOOLS_DIR", ROOT / ".tools"))
METRICS_PORT = 9464

# The worker's metrics, as exposed (counters with their _total suffix), by type.
METRICS = {
    "inferlog_records_consumed_total": "counter",
    "inferlog_results_total": "counter",
    "inferlog_dead_letters_total": "counter",
    "inferlog_tokens_total": "counter",
    "inferlog_commits_total": "counter",
    "inferlog_batch_size": "histogram",
    "inferlog_batch_tokens": "histogram",
    "inferlog_stage_seconds": "histogram",
    "inferlog_end_to_end_seconds": "histogram",
    "inferlog_executor_queue_wait_seconds": "histogram",
    "inferlog_consumer_lag": "gauge",
    "inferlog_in_flight_records": "gauge",
    "inferlog_held_records": "gauge",
    "inferlog_paused_partitions": "gauge",
    "inferlog_device_memory_bytes": "gauge",
    "inferlog_device_utilization": "gauge",
    "inferlog_ready": "gauge",
}


def _missing(what: str):
    msg = f"{what} is not installed; run .ci/tools/install-deploy-tools.sh [{TOOLS}]"
    if os.environ.get("INFERLOG_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def helm() -> str:
    exe = TOOLS / "bin" / "helm"
    found = str(exe) if exe.is_file() else shutil.which("helm")
    if not found:
        _missing("helm")
    return found


@pytest.fixture(scope="session")
def k8s_validate():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate (PyPI)")
    return kubernetes_validate


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): openAPIV3Schema} from the CRD files the tools script copied."""
    files = sorted((TOOLS / "crds").glob("*.yaml"))
    if not files:
        _missing("the CRDs (ServiceMonitor, ScaledObject, TriggerAuthentication)")
    out = {}
    for f in files:
        crd = yaml.safe_load(f.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{group}/{v['name']}", kind)] = strict(v["schema"]["openAPIV3Schema"])
    return out


def strict(schema):
    """A CRD's schema as the API server applies it: fields it does not know are errors
    here (the server would silently prune them), unless the CRD preserves them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def run_helm(helm: str, *args: str, values: list[Path] = (), sets: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [helm, *args, str(CHART)]
    for v in values:
        cmd += ["-f", str(v)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def render(helm: str, values: list[Path] = (), sets: list[str] = ()) -> list[dict]:
    res = run_helm(helm, "template", "rel", values=values, sets=sets)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def workers_of(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def worker_of(docs: list[dict]) -> dict:
    (w,) = workers_of(docs)
    return w


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


VALUE_SETS = [pytest.param([], id="defaults")] + [pytest.param([f], id=f.stem) for f in CI_VALUES] + [
    pytest.param(CI_VALUES, id="all-ci-values")]


# -- helm: lint, render, schemas --------------------------------------------------------------

@pytest.mark.parametrize("values", VALUE_SETS)
def test_chart_lints_and_renders_valid_kubernetes_objects(helm, k8s_validate, crd_schemas, values):
    lint = run_helm(helm, "lint", "--strict", values=values)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, values)
    assert docs
    assert_valid(docs, k8s_validate, crd_schemas)


def assert_valid(docs: list[dict], k8s_validate, crd_schemas) -> None:
    """Every rendered object against its Kubernetes (or CRD) schema."""
    import jsonschema

    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in crd_schemas:  # custom resources: their CRD's structural schema
            # metadata is the API server's (ObjectMeta), which the CRD leaves open
            jsonschema.validate({**doc, "metadata": {}}, crd_schemas[key])
            continue
        # the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
        for version in ("1.25.0", k8s_validate.latest_version()):
            try:
                k8s_validate.validate(doc, version, strict=True)
            except k8s_validate.SchemaNotFoundError as e:
                pytest.fail(f"{key} has no schema in Kubernetes {version} nor in the CRDs: {e}")
            except k8s_validate.ValidationError as e:
                pytest.fail(f"{key} {doc['metadata']['name']} is invalid for Kubernetes {version}: {e.message}")


def test_default_worker_deployment(helm):
    docs = render(helm)
    w = worker_of(docs)
    assert w["kind"] == "Deployment" and w["spec"]["replicas"] == 2
    pod = w["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in c["ports"]
    env = env_of(c)
    assert env["INFERLOG_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["INFERLOG_METRICS_PORT"]["value"] == str(METRICS_PORT)
    assert env["INFERLOG_PARTITIONS"]["value"] == "6"
    assert all(n.startswith(("INFERLOG_", "OTEL_")) for n in env)
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["port"] == METRICS_PORT
    assert by_kind(docs, "PodDisruptionBudget") and by_kind(docs, "ServiceAccount")
    assert not by_kind(docs, "ScaledObject") and not by_kind(docs, "ServiceMonitor")
    (job,) = by_kind(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["kafka", "topics"]


def test_gpu_values(helm):
    docs = render(helm, [CHART / "ci" / "gpu-values.yaml"])
    pod = worker_of(docs)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["containers"][0]["image"].endswith("-cuda")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "podAntiAffinity" in pod["affinity"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["INFERLOG_PROCESSES_PER_GPU"] == "1"


def test_processes_per_gpu_count_as_consumers(helm, k8s_validate, crd_schemas):
    """Two processes on each of a pod's 2 GPUs: 4 consumers per pod, so 3 pods need 12 partitions
    (with 6 the chart refuses: test_inconsistent_values_fail_to_render)."""
    gpu = [CHART / "ci" / "gpu-values.yaml"]
    docs = render(helm, gpu, sets=["gpu.processesPerGpu=2", "kafka.partitions=12", "serviceMonitor.enabled=true"])
    assert_valid(docs, k8s_validate, crd_schemas)
    container = worker_of(docs)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["INFERLOG_PROCESSES_PER_GPU"] == "2"
    # each process serves its metrics on metricsPort + i, and each is exposed and scraped
    port = int(env["INFERLOG_METRICS_PORT"])
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == \
        [("metrics", port)] + [(f"metrics-{i}", port + i) for i in range(1, 4)]
    (svc,) = [d for d in by_kind(docs, "Service") if not d["metadata"]["name"].endswith("-headless")]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["metrics", "metrics-1", "metrics-2", "metrics-3"]
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics", "metrics-1", "metrics-2", "metrics-3"]


def test_keda_owns_the_replica_count(helm):
    docs = render(helm, [CHART / "ci" / "keda-values.yaml"])
    assert "replicas" not in worker_of(docs)["spec"]
    (so,) = by_kind(docs, "ScaledObject")
    assert so["spec"]["maxReplicaCount"] <= 12  # kafka.partitions in keda-values.yaml
    triggers = so["spec"]["triggers"]
    # one per tier of the model: the high tier's backlog scales the workers as the normal one's does
    assert sorted(t["metadata"]["topic"] for t in triggers) == ["inferlog.requests.all-MiniLM-L6-v2",
                                                                "inferlog.requests.high.all-MiniLM-L6-v2"]
    for t in triggers:
        assert t["type"] == "kafka"
        assert t["metadata"]["consumerGroup"] == "inferlog-workers.all-MiniLM-L6-v2"
    # and the workers read the topics KEDA watches: the prefixes, followed by their served name
    env = {e["name"]: e.get("value") for e in worker_of(docs)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["INFERLOG_REQUESTS_TOPIC"], env["INFERLOG_HIGH_PRIORITY_TOPIC"]) == ("inferlog.requests",
                                                                                  "inferlog.requests.high")
    assert env["INFERLOG_SERVED_MODEL_NAME"] == "all-MiniLM-L6-v2" and env["INFERLOG_TOPIC_LAYOUT"] == "per-model"


# -- helm: one set of request topics, one group and one workload per served model ---------------

def model_settings(name: str, layout: str = "per-model"):
    """A worker's settings for the served model `name`, with the chart's default topic and group
    names: what it reads and the group it joins (inferlog/settings.py)."""
    from inferlog.settings import Settings

    k = DEFAULTS["kafka"]
    return Settings(model_name=name, requests_topic=k["topics"]["requests"], high_priority_topic=k["topics"]["high"],
                    group_id=k["groupId"], topic_layout=layout)


def scaled_topics(so: dict) -> tuple[set[str], set[str]]:
    """A ScaledObject's topics and consumer groups."""
    meta = [t["metadata"] for t in so["spec"]["triggers"] if t["type"] == "kafka"]
    return {m["topic"] for m in meta}, {m["consumerGroup"] for m in meta}


def test_without_models_the_default_model_has_its_own_topics_and_group(helm):
    """No `models`: one worker as before (its object names and selector), on the topics and in
    the group of the embedded model's served name, as the worker computes them."""
    docs = render(helm, sets=["keda.enabled=true"])
    k = DEFAULTS["kafka"]
    assert (k["topics"]["requests"], k["topics"]["high"], k["groupId"]) == (
        "inferlog.requests", "inferlog.requests.high", "inferlog-workers")
    assert DEFAULTS["models"] == [] and DEFAULTS["worker"]["model"] == DEFAULTS["worker"]["modelName"] == ""
    w = worker_of(docs)
    assert w["metadata"]["name"] == "rel-inferlog"
    assert "inferlog.dev/model" not in w["spec"]["selector"]["matchLabels"]  # a selector cannot change
    assert w["spec"]["template"]["metadata"]["labels"]["inferlog.dev/model"] == "all-MiniLM-L6-v2"
    env = env_of(w["spec"]["template"]["spec"]["containers"][0])
    assert env["INFERLOG_SERVED_MODEL_NAME"]["value"] == "all-MiniLM-L6-v2" and "INFERLOG_MODEL" not in env
    (so,) = by_kind(docs, "ScaledObject")
    assert so["metadata"]["name"] == so["spec"]["scaleTargetRef"]["name"] == "rel-inferlog"
    assert scaled_topics(so) == ({"inferlog.requests.all-MiniLM-L6-v2", "inferlog.requests.high.all-MiniLM-L6-v2"},
                                 {"inferlog-workers.all-MiniLM-L6-v2"})
    s = model_settings("all-MiniLM-L6-v2")
    assert scaled_topics(so) == (set(s.request_topics), {s.worker_group})
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert pdb["metadata"]["name"] == "rel-inferlog"
    assert pdb["spec"]["selector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"]
    (job,) = by_kind(docs, "Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert env_of(c)["INFERLOG_SERVED_MODEL_NAME"]["value"] == "all-MiniLM-L6-v2"


def test_shared_topic_layout_keeps_the_topics_and_group_as_named(helm):
    docs = render(helm, sets=["keda.enabled=true", "kafka.topicLayout=shared"])
    (so,) = by_kind(docs, "ScaledObject")
    s = model_settings("all-MiniLM-L6-v2", "shared")
    assert scaled_topics(so) == (set(s.request_topics), {s.worker_group}) == (
        {"inferlog.requests", "inferlog.requests.high"}, {"inferlog-workers"})
    env = env_of(worker_of(docs)["spec"]["template"]["spec"]["containers"][0])
    assert env["INFERLOG_TOPIC_LAYOUT"]["value"] == "shared"


@pytest.mark.parametrize("model", ["my-gpt2", "models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/0123abc",
                                   "sentence-transformers/all-mpnet-base-v2", ""])
def test_served_name_from_the_worker_model_is_the_workers(helm, tmp_path, model):
    """Without worker.modelName the chart names the model as `inferlog worker` would (a folder's
    name, a hub cache snapshot's repository, a hub id as it is) and passes that name on."""
    from inferlog.settings import DEFAULT_NAME, served_name_of

    if model and not model.startswith("sentence-transformers/"):  # folders: as mounted in the pod
        (tmp_path / model).mkdir(parents=True)
        model = str(tmp_path / model)
    docs = render(helm, sets=["keda.enabled=true", f"worker.model={model}"])
    name = served_name_of(model) if model else DEFAULT_NAME
    env = env_of(worker_of(docs)["spec"]["template"]["spec"]["containers"][0])
    assert env["INFERLOG_SERVED_MODEL_NAME"]["value"] == name
    s = model_settings(name)
    assert scaled_topics(by_kind(docs, "ScaledObject")[0]) == (set(s.request_topics), {s.worker_group})


TWO_MODELS = {
    "kafka": {"partitions": 6},
    "keda": {"enabled": True, "maxReplicaCount": 3},
    "image": {"variant": "cuda"},
    "gpu": {"enabled": True, "count": 1},
    "models": [
        {"name": "minilm", "replicas": 3, "keda": {"enabled": False}},
        {"name": "Qwen/Qwen2.5-0.5B-Instruct", "model": "/models/qwen", "task": "generate",  # the hash form
         "gpu": {"count": 2}, "worker": {"dtype": "bfloat16"},
         "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "24Gi"}},
         "nodeSelector": {"gpu": "h100"}, "env": [{"name": "INFERLOG_MAX_NEW_TOKENS_LIMIT", "value": "512"}]},
    ],
}


def test_each_model_has_its_own_workers_topics_and_group(helm, k8s_validate, crd_schemas, tmp_path):
    from inferlog.settings import topic_segment

    values = tmp_path / "two-models.yaml"
    values.write_text(yaml.safe_dump(TWO_MODELS))
    lint = run_helm(helm, "lint", "--strict", values=[values])
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, [values])
    assert_valid(docs, k8s_validate, crd_schemas)
    names = ["minilm", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert topic_segment(names[1]) != names[1]  # sanitized and hashed
    workers = {w["metadata"]["annotations"]["inferlog.dev/served-model-name"]: w for w in workers_of(docs)}
    assert sorted(workers) == sorted(names)
    assert {w["metadata"]["name"] for w in workers.values()} == {"rel-inferlog-worker-minilm",
                                                                 "rel-inferlog-worker-qwen-qwen2-5-0-5b-instruct"}
    selectors = [w["spec"]["selector"]["matchLabels"] for w in workers.values()]
    assert selectors[0] != selectors[1]  # one model's rollout, PDB and scaling never take the other's pods
    for w in workers.values():
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()

    def pod(name):
        return workers[name]["spec"]["template"]["spec"]

    env = {n: env_of(pod(n)["containers"][0]) for n in names}
    assert {n: env[n]["INFERLOG_SERVED_MODEL_NAME"]["value"] for n in names} == {n: n for n in names}
    assert "INFERLOG_MODEL" not in env["minilm"] and "INFERLOG_TASK" not in env["minilm"]  # the embedded model
    assert env[names[1]]["INFERLOG_MODEL"]["value"] == "/models/qwen"
    assert env[names[1]]["INFERLOG_TASK"]["value"] == "generate"
    assert env[names[1]]["INFERLOG_DTYPE"]["value"] == "bfloat16" and env["minilm"]["INFERLOG_DTYPE"]["value"] == "auto"
    assert env[names[1]]["INFERLOG_MAX_NEW_TOKENS_LIMIT"]["value"] == "512"
    assert "INFERLOG_MAX_NEW_TOKENS_LIMIT" not in env["minilm"]
    # each its own GPUs, resources and nodes
    limits = {n: pod(n)["containers"][0]["resources"]["limits"] for n in names}
    assert limits["minilm"]["nvidia.com/gpu"] == 1 and limits[names[1]]["nvidia.com/gpu"] == 2
    assert limits["minilm"]["memory"] == "4Gi" and limits[names[1]]["memory"] == "24Gi"
    assert pod(names[1])["nodeSelector"] == {"gpu": "h100"} and "nodeSelector" not in pod("minilm")
    assert workers["minilm"]["spec"]["replicas"] == 3 and "replicas" not in workers[names[1]]["spec"]
    # KEDA scales the one model that has it on its own topics and group, as its worker computes them
    (so,) = by_kind(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == workers[names[1]]["metadata"]["name"]
    seg = topic_segment(names[1])
    assert scaled_topics(so) == ({f"inferlog.requests.{seg}", f"inferlog.requests.high.{seg}"},
                                 {f"inferlog-workers.{seg}"})
    s = model_settings(names[1])
    assert scaled_topics(so) == (set(s.request_topics), {s.worker_group})
    # a PodDisruptionBudget each, over its own pods
    pdbs = {p["metadata"]["name"]: p["spec"]["selector"]["matchLabels"] for p in by_kind(docs, "PodDisruptionBudget")}
    assert pdbs == {w["metadata"]["name"]: w["spec"]["selector"]["matchLabels"] for w in workers.values()}
    # the hook Job creates each model's topics
    (job,) = by_kind(docs, "Job")
    made = [env_of(c)["INFERLOG_SERVED_MODEL_NAME"]["value"] for c in job["spec"]["template"]["spec"]["containers"]]
    assert made == names


def test_both_models_scale_on_their_own_topics(helm, tmp_path):
    """Two ScaledObjects, each naming only its model's topics (both tiers) and group."""
    from inferlog.settings import topic_segment

    values = tmp_path / "two-models.yaml"
    models = [{**m, "keda": {"enabled": True, "maxReplicaCount": 2}} for m in TWO_MODELS["models"]]
    values.write_text(yaml.safe_dump({**TWO_MODELS, "models": models}))
    docs = render(helm, [values])
    scaled = {so["metadata"]["annotations"]["inferlog.dev/served-model-name"]: so
              for so in by_kind(docs, "ScaledObject")}
    assert sorted(scaled) == sorted(m["name"] for m in models)
    workers = {w["metadata"]["name"] for w in workers_of(docs)}
    for name, so in scaled.items():
        seg = topic_segment(name)
        assert scaled_topics(so) == ({f"inferlog.requests.{seg}", f"inferlog.requests.high.{seg}"},
                                     {f"inferlog-workers.{seg}"})
        assert so["spec"]["maxReplicaCount"] == 2 and so["spec"]["scaleTargetRef"]["name"] in workers
    assert len({so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()}) == 2


def test_sasl_and_tls_come_from_secrets(helm):
    docs = render(helm, [CHART / "ci" / "sasl-tls-values.yaml"])
    for pod in (worker_of(docs)["spec"]["template"]["spec"], by_kind(docs, "Job")[0]["spec"]["template"]["spec"]):
        env = env_of(pod["containers"][0])
        assert env["INFERLOG_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
        assert env["INFERLOG_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "inferlog-kafka-user",
                                                                              "key": "password"}
        assert "value" not in env["INFERLOG_SASL_PASSWORD"]
        ca = env["INFERLOG_SSL_CAFILE"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert ca.startswith(mounts["kafka-ca"] + "/")
        assert vols["kafka-ca"]["secret"]["secretName"] == "kafka-cluster-ca"
    (auth,) = by_kind(docs, "TriggerAuthentication")
    assert {"parameter": "password", "name": "inferlog-kafka-user", "key": "password"} in auth["spec"]["secretTargetRef"]


def test_servicemonitor_and_statefulset(helm):
    docs = render(helm, [CHART / "ci" / "servicemonitor-values.yaml", CHART / "ci" / "statefulset-values.yaml"])
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    w = worker_of(docs)
    assert w["kind"] == "StatefulSet"
    assert w["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    env = env_of(w["spec"]["template"]["spec"]["containers"][0])
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http://")


def test_replay_job_runs_the_members_of_one_shared_run(helm):
    def replay_jobs(docs):
        return [j for j in by_kind(docs, "Job") if j["metadata"]["labels"]["app.kubernetes.io/component"] == "replay"]

    assert not replay_jobs(render(helm)), "off by default"
    (job,) = replay_jobs(render(helm, [CHART / "ci" / "replay-values.yaml"]))
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] == 3 and spec["completionMode"] == "Indexed"
    (c,) = spec["template"]["spec"]["containers"]
    assert c["args"][:3] == ["replay", "--join", "audit-1"]
    env = env_of(c)  # a replaced pod keeps its index, so its worker id, and fences its predecessor
    assert env["INFERLOG_WORKER_ID"]["value"] == "member-$(MEMBER_INDEX)"
    assert "job-completion-index" in env["MEMBER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]


# -- helm: what must be refused ----------------------------------------------------------------

SCHEMA = "don't meet the specifications of the schema"  # helm's values.schema.json error


@pytest.mark.parametrize("sets, why", [
    (["replicas=two"], [SCHEMA, "/replicas"]),
    (["replicas=0"], [SCHEMA, "/replicas"]),
    (["replicas=1.5"], [SCHEMA, "/replicas"]),
    (["replicaCount=2"], [SCHEMA, "replicaCount"]),  # unknown key (a typo of replicas)
    (["kafka.partition=6"], [SCHEMA, "partition"]),
    (["kafka.securityProtocol=TLS"], [SCHEMA, "/kafka/securityProtocol"]),
    (["gpu.count=0"], [SCHEMA, "/gpu/count"]),
    (["workload.kind=DaemonSet"], [SCHEMA, "/workload/kind"]),
    (["replicas=7"], ["replicas (7)", "exceeds kafka.partitions (6)"]),
    (["gpu.enabled=true", "gpu.count=2", "replicas=4"], ["consumers per pod (2)", "exceeds kafka.partitions"]),
    (["gpu.enabled=true", "gpu.count=2", "gpu.processesPerGpu=2", "replicas=2"],
     ["consumers per pod (4)", "exceeds kafka.partitions (6)"]),
    (["keda.enabled=true", "keda.maxReplicaCount=7"], ["keda.maxReplicaCount (7)", "exceeds kafka.partitions"]),
    (["kafka.sasl.enabled=true", "kafka.sasl.existingSecret=s"], ["securityProtocol SASL_PLAINTEXT or SASL_SSL"]),
    (["kafka.securityProtocol=SASL_SSL"], ["needs kafka.sasl.enabled"]),
    (["kafka.securityProtocol=SSL", "kafka.tls.enabled=true"], ["kafka.tls.caSecret"]),
    (["replay.enabled=true"], ["replay.enabled needs replay.runId"]),
    (["replay.enabled=true", "replay.runId=a/b"], [SCHEMA, "/replay/runId"]),
    (["models[0].model=/models/x"], [SCHEMA, "/models/0", "name"]),
    (["models[0].name=a", "models[0].worker.model=/models/x"], [SCHEMA, "/models/0/worker"]),
    (["models[0].name=a", "models[0].gpu.count=0"], [SCHEMA, "/models/0/gpu/count"]),
    (["kafka.topicLayout=by-model"], [SCHEMA, "/kafka/topicLayout"]),
    (["models[0].name=a", "models[1].name=a"], ["two models have the served name \"a\""]),
    (["models[0].name=a.b", "models[1].name=a/b"], ["two models have the object name \"rel-inferlog-worker-a-b\""]),
    (["models[0].name=high"], ["model name \"high\" would read the shared topic \"inferlog.requests.high\""]),
    (["models[0].name=a", "models[1].name=b", "kafka.topicLayout=shared"], ["topicLayout shared", "one model"]),
    (["models[0].name=a", "models[1].name=b", "models[1].replicas=7"], ["models b: replicas (7)",
                                                                       "exceeds kafka.partitions (6)"]),
    (["models[0].name=a", "models[0].keda.enabled=true", "models[0].keda.maxReplicaCount=7"],
     ["models a: keda.maxReplicaCount (7)"]),
])
def test_bad_values_are_refused(helm, sets, why):
    res = run_helm(helm, "template", "rel", sets=sets)
    assert res.returncode != 0, f"{sets} rendered"
    for text in why:
        assert text in res.stderr, res.stderr


# -- docker compose ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification(compose):
    import jsonschema

    spec = TOOLS / "compose-spec.json"
    if not spec.is_file():
        _missing("the Compose Specification schema")
    schema = json.loads(spec.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(compose)


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["chat"], ["gpu", "chat"]])
def test_compose_loads_like_docker_compose_config(profiles):
    """compose-go's loader (what `docker compose config` runs): schema, interpolation,
    normalization and the consistency checks, e.g. depends_on an unknown service."""
    exe = TOOLS / "bin" / "compose-check"
    if not exe.is_file():
        _missing("compose-check")
    args = [a for p in profiles for a in ("-profile", p)]
    res = subprocess.run([str(exe), *args, "docker-compose.yml"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")})
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    assert {"kafka", "topic-init", "worker", "gateway", "prometheus", "grafana", "jaeger"} <= set(services)
    assert ("worker-gpu" in services) == ("gpu" in profiles)
    assert ("worker-chat" in services) == ("chat" in profiles)
    if "chat" in profiles:
        # the gateway sees the chat model's files where its worker does (and announces them)
        def binds(svc):
            return {v["target"]: v["source"] for v in services[svc]["volumes"] if v["type"] == "bind"}

        chat = services["worker-chat"]
        model = chat["environment"]["INFERLOG_MODEL"]
        (target,) = [t for t in binds("worker-chat") if model.startswith(t + "/")]
        assert binds("gateway")[target] == binds("worker-chat")[target]


def test_compose_references(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
        for vol in svc.get("volumes", []):
            src = re.match(r"\$\{[^}]*\}|[^:]*", vol).group()
            if src.startswith("${"):  # a folder of the user's: ${VAR:-default}
                assert re.fullmatch(r"\$\{[A-Z_]+:-\./[^}]+\}", src), f"{name} mounts {src}: give it a default"
            elif src.startswith("."):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in compose["volumes"], f"{name} uses undeclared volume {src}"
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["topic-init"]["command"] == ["kafka", "topics"]
    assert services["worker"]["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    assert "profiles" not in services["worker"]  # the CPU worker runs by default
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["capabilities"] == ["gpu"] and dev["driver"] == "nvidia"
    for w in (services["worker"], gpu):
        assert w["environment"]["INFERLOG_METRICS_PORT"] == str(METRICS_PORT)
        assert w["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:")
    # a second model, on its own topics and group: off by default, by path (nothing is downloaded)
    chat = services["worker-chat"]
    assert chat["profiles"] == ["chat"]
    env = chat["environment"]
    assert env["INFERLOG_SERVED_MODEL_NAME"] == "chat" and env["INFERLOG_MODEL"].startswith("/models/")
    assert "INFERLOG_SERVED_MODEL_NAME" not in services["worker"]["environment"]  # the default model's name
    assert env["INFERLOG_METRICS_PORT"] == str(METRICS_PORT)
    # topic-init makes the default model's request topics only: the chat worker creates its own
    assert chat["command"][0] == "worker" and "--no-create-topics" not in chat["command"]
    gateway = services["gateway"]
    assert "profiles" not in gateway and gateway["command"] == ["gateway"]
    mount = next(v for v in chat["volumes"] if v.split(":")[-2] == "/models")
    assert mount in gateway["volumes"]  # the same files at the same path: the chat template
    assert gateway["environment"]["INFERLOG_GATEWAY_HOST"] == "0.0.0.0"
    port = gateway["environment"]["INFERLOG_GATEWAY_PORT"]
    assert gateway["ports"] == [f"127.0.0.1:{port}:{port}"]  # it runs open: the host's loopback only


# -- observability config ----------------------------------------------------------------------

def test_prometheus_scrapes_the_workers_metrics_port(compose):
    conf = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "inferlog-worker"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for s in job.get("static_configs", []) for t in s["targets"]]
    ports = {int(t.rsplit(":", 1)[1]) for t in targets} | {d["port"] for d in job.get("dns_sd_configs", [])}
    assert ports == {METRICS_PORT}
    names = {n for d in job.get("dns_sd_configs", []) for n in d["names"]} | {t.rsplit(":", 1)[0] for t in targets}
    assert {"worker", "worker-gpu", "worker-chat"} <= names
    assert names <= set(compose["services"])


def test_metric_list_matches_the_worker():
    """The list above (and so the dashboard) against the worker's own registry."""
    metrics = pytest.importorskip("inferlog.consumer.metrics", reason="the worker's metrics module is not importable")
    exposed = {}
    for family in metrics.Metrics().registry.collect():
        exposed[family.name + ("_total" if family.type == "counter" else "")] = family.type
    assert exposed == METRICS


def _dashboard_exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_queries_only_the_workers_metrics():
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "inferlog.json").read_text())
    used = set()
    for expr in _dashboard_exprs(dash):
        for name in re.findall(r"\binferlog_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name and METRICS.get(base) == "histogram":
                used.add(base)
            else:
                assert METRICS.get(name) in ("counter", "gauge"), f"{name} in {expr!r} is not a worker metric"
                used.add(name)
            if METRICS[base if base in METRICS else name] == "counter":
                assert f"rate({name}" in expr, f"counter {name} used without rate(): {expr!r}"
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"
    assert any(e.startswith("histogram_quantile(0.99") and "inferlog_end_to_end_seconds_bucket" in e
               for e in _dashboard_exprs(dash))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_dashboard_is_generated_from_its_script():
    spec = importlib.util.spec_from_file_location("build_dashboard", ROOT / "deploy" / "grafana" / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = json.loads(mod.OUT.read_text())
    assert committed == mod.dashboard(), "run python deploy/grafana/build_dashboard.py"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose):
    root = ROOT / "deploy" / "grafana" / "provisioning"
    (ds,) = [d for d in yaml.safe_load((root / "datasources" / "prometheus.yml").read_text())["datasources"]
             if d["type"] == "prometheus"]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (prov,) = yaml.safe_load((root / "dashboards" / "inferlog.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == prov["options"]["path"]


def test_dockerfile_basics():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["inferlog"]' in text and 'CMD ["worker"]' in text
    assert "HF_HUB_OFFLINE=1" in text and "/healthz" in text
    assert f"EXPOSE {METRICS_PORT}" in text
