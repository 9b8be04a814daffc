"""The Kubernetes manifests: valid for Kubernetes and KEDA, and consistent with the worker they run.

No cluster runs where the tests run: the standard kinds are checked with the `kubernetes-validate`
package (the API's own schemas, strict: an unknown field is an error), the KEDA kinds against the
JSON Schemas of KEDA's CRDs (a copy in `tests/data/keda/`, see its NOTICE.md), and every
value the worker also knows (probe paths and port, drain timeout, settings, queue, user, command)
against the worker's code, its Settings defaults and its Dockerfile.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from deploy_support import DOCKERFILE, REPO, load_yaml, read_dockerfile

from worker.core.settings import Settings
from worker.observability.http import ReplicaView, build_app

KUBERNETES = REPO / "deploy" / "kubernetes"
# A copy of ../shared/schemas/keda (tests/data/keda/NOTICE.md says where it comes from).
KEDA_SCHEMAS = REPO / "tests" / "data" / "keda"
README = REPO / "README.md"
# The oldest version these manifests are meant for, and the newest the package ships.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")
# Fields whose values carry passwords or keys: only in the Secret.
SECRET_SETTINGS = frozenset({"RABBITMQ_URL", "REDIS_URL", "REDIS_CACHE_URL", "LLM_API_KEY"})
# Trigger metadata KEDA's rabbitmq scaler reads (pkg/scalers/rabbitmq_scaler.go); anything else
# would be ignored without a word.
RABBITMQ_TRIGGER_KEYS = frozenset(
    {
        "host",
        "hostFromEnv",
        "protocol",
        "mode",
        "value",
        "activationValue",
        "queueName",
        "vhostName",
        "useRegex",
        "excludeUnacknowledged",
        "pageSize",
        "operation",
        "timeout",
        "unsafeSsl",
    }
)
# Room for closing the connections and flushing the counters after the drain.
CLOSE_MARGIN_S = 5
RSS_HEADROOM = 1.5


def _documents() -> list[dict[str, Any]]:
    """Every YAML document of the manifests, kustomization.yaml aside."""
    found: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(document, dict), f"{path.name}: a document is not a mapping"
            found.append(document)
    return found


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one document of this kind (and name)."""
    matches = [
        d
        for d in _documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per replica"
    return cast(dict[str, Any], containers[0])


def _configmap() -> dict[str, str]:
    return cast(dict[str, str], _one("ConfigMap")["data"])


def _worker_secret() -> dict[str, str]:
    """The Secret the Deployment takes its environment from."""
    refs = [s["secretRef"]["name"] for s in _container()["envFrom"] if "secretRef" in s]
    assert len(refs) == 1, refs
    return cast(dict[str, str], _one("Secret", refs[0])["stringData"])


def _setting(name: str) -> Any:
    """A setting as the replicas see it: the ConfigMap's value, else the Settings default."""
    values = {k.lower(): v for k, v in {**_configmap(), **_worker_secret()}.items()}
    return getattr(Settings.model_validate(values), name)


def _probe_port(probe: dict[str, Any]) -> int:
    """The container port a probe asks, resolving a port name."""
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    return int(by_name[port])


def _bytes(quantity: str) -> float:
    """A Kubernetes memory quantity (128Mi, 1G, 256M...) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?", quantity)
    assert match, f"unexpected memory quantity {quantity!r}"
    factor = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9, None: 1}
    return float(match.group(1)) * factor[match.group(2)]


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever it lists properties and allows
    nothing else explicitly: the API server prunes unknown fields of a CRD silently, so a
    misspelt field would otherwise pass."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _keda_schema(kind: str) -> dict[str, Any]:
    path = KEDA_SCHEMAS / f"{kind}.json"
    return cast(dict[str, Any], _strict(json.loads(path.read_text(encoding="utf-8"))))


def test_the_manifests_hold_the_expected_kinds() -> None:
    """The folder holds the worker's ConfigMap, Secrets, Deployment, PodDisruptionBudget and the
    two KEDA objects, each once (the management Secret aside), and nothing else."""
    kinds = sorted(d["kind"] for d in _documents())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "ScaledObject",
            "Secret",
            "Secret",
            "TriggerAuthentication",
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_standard_kinds_are_valid_kubernetes(version: str) -> None:
    """Every non-KEDA document is valid, unknown fields included, for the Kubernetes version."""
    checked = 0
    for document in _documents():
        if document["kind"] in KEDA_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = f"{document['kind']} {document['metadata']['name']} {list(error.path)}"
            pytest.fail(f"{where}: {error.message}", pytrace=False)
        checked += 1
    assert checked == 5


@pytest.mark.parametrize("kind", KEDA_KINDS)
def test_keda_kinds_match_the_crd_schemas(kind: str) -> None:
    """The ScaledObject and TriggerAuthentication are valid by KEDA's CRDs, unknown fields
    included."""
    document = _one(kind)
    assert document["apiVersion"] == "keda.sh/v1alpha1"
    validator = jsonschema.Draft7Validator(_keda_schema(kind))
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_a_misspelt_keda_field_is_caught() -> None:
    """The strict KEDA schema refuses a field the CRD does not define (what the API server
    would prune)."""
    document = copy.deepcopy(_one("ScaledObject"))
    document["spec"]["pollingIntervall"] = 15
    validator = jsonschema.Draft7Validator(_keda_schema("ScaledObject"))
    assert not validator.is_valid(document)


@dataclass
class _Identity:
    replica_id: str


@dataclass
class _NotReady:
    """What build_app's health handlers read of a replica that is not consuming."""

    identity: _Identity

    def readiness(self) -> tuple[bool, str]:
        return False, "the broker is unreachable"


def test_probe_paths_are_the_workers_health_routes() -> None:
    """Each probe path is a route of the worker's HTTP app; startup and liveness ask the same."""
    routes = {
        r.canonical
        for r in build_app(cast(ReplicaView, _NotReady(_Identity("x")))).router.resources()
    }
    container = _container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
    assert container["startupProbe"]["httpGet"] == container["livenessProbe"]["httpGet"]
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes


async def test_readiness_probe_fails_and_liveness_passes_while_not_ready() -> None:
    """Against the worker's own app, the readiness probe's path answers 503 and the liveness
    probe's 200 while the replica is not consuming: a broker outage restarts nothing."""
    container = _container()
    view = cast(ReplicaView, _NotReady(_Identity("replica-1")))
    async with TestClient(TestServer(build_app(view))) as http:
        ready = await http.get(container["readinessProbe"]["httpGet"]["path"])
        live = await http.get(container["livenessProbe"]["httpGet"]["path"])
    assert (ready.status, live.status) == (503, 200)


def test_probes_and_metrics_use_the_stats_port() -> None:
    """The probes, the container port and the scrape annotation use the port the worker listens
    on (STATS_PORT: the ConfigMap's, the Settings default, the image's ENV and EXPOSE)."""
    container = _container()
    port = _setting("stats_port")
    assert port == Settings.model_fields["stats_port"].default
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _probe_port(container[probe]) == port, probe
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port
    _, stages = read_dockerfile(DOCKERFILE)
    runtime = stages[-1]
    env = {k: v for i in runtime.all("ENV") for k, v in i.env_pairs().items()}
    assert int(env["STATS_PORT"]) == port
    assert str(port) in runtime.last("EXPOSE").arguments.split()
    assert _setting("stats_host") == "0.0.0.0", "probes come from outside the container"


def test_grace_period_outlasts_the_drain_timeout() -> None:
    """Kubernetes waits longer after SIGTERM than the worker drains (DRAIN_TIMEOUT_S of the
    ConfigMap, else its default), with room to close the connections."""
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = _setting("drain_timeout_s")
    assert grace >= drain + CLOSE_MARGIN_S, (grace, drain)
    assert grace >= 30


def test_configmap_holds_only_worker_settings_and_no_secret() -> None:
    """Every ConfigMap key is a Settings field (upper-cased), none of them a secret, and with the
    Secret's values they make valid Settings."""
    fields = {name.upper() for name in Settings.model_fields}
    data = _configmap()
    assert set(data) <= fields, sorted(set(data) - fields)
    assert not set(data) & SECRET_SETTINGS
    assert not any("@" in value for value in data.values()), "a URL with credentials"
    assert _setting("input_queue") == data["INPUT_QUEUE"]


def test_secret_holds_the_connection_urls() -> None:
    """The Secret the replicas read carries RABBITMQ_URL, REDIS_URL and REDIS_CACHE_URL (the
    cache on a Redis of its own), only settings, and the Deployment takes its environment from it
    and the ConfigMap."""
    secret = _worker_secret()
    assert {"RABBITMQ_URL", "REDIS_URL", "REDIS_CACHE_URL"} <= set(secret)
    assert _setting("cache_redis_separate"), "claims and cache each on their own Redis"
    assert set(secret) <= {name.upper() for name in Settings.model_fields}
    config_refs = [
        s["configMapRef"]["name"] for s in _container()["envFrom"] if "configMapRef" in s
    ]
    assert config_refs == [_one("ConfigMap")["metadata"]["name"]]
    assert _setting("redis_enabled"), "the template is the Redis set-up, not memory mode"


def _trigger() -> dict[str, Any]:
    triggers = _one("ScaledObject")["spec"]["triggers"]
    assert len(triggers) == 1
    return cast(dict[str, Any], triggers[0])


def test_scaled_object_scales_the_deployment_on_the_input_queue() -> None:
    """The ScaledObject targets the Deployment and counts the ConfigMap's INPUT_QUEUE over the
    management API in QueueLength mode, unacknowledged messages included, with at least one
    prefetch window per replica."""
    spec = _one("ScaledObject")["spec"]
    deployment = _one("Deployment")
    assert spec["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the ScaledObject owns the replica count"
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    trigger = _trigger()
    metadata = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert set(metadata) <= RABBITMQ_TRIGGER_KEYS, sorted(set(metadata) - RABBITMQ_TRIGGER_KEYS)
    assert metadata["protocol"] == "http"
    assert metadata["mode"] == "QueueLength"
    assert metadata.get("excludeUnacknowledged", "false") == "false"
    assert metadata["queueName"] == _setting("input_queue")
    assert float(metadata["value"]) >= _setting("prefetch")
    assert not {"host", "hostFromEnv"} & set(metadata), "the URL comes from the Secret"


def test_trigger_authentication_reads_the_management_url_from_the_secret() -> None:
    """The trigger's authentication is the TriggerAuthentication, whose `host` parameter is a key
    of the management Secret holding an http URL of the workers' virtual host."""
    auth = _one("TriggerAuthentication")
    assert _trigger()["authenticationRef"] == {"name": auth["metadata"]["name"]}
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"host"}
    secret = _one("Secret", refs["host"]["name"])["stringData"]
    management = urlsplit(secret[refs["host"]["key"]])
    assert management.scheme in {"http", "https"}
    assert management.username, "the management API needs a user"
    assert management.path, "KEDA needs the trailing slash (or /vhost) after the port"
    # KEDA: the last path segment is the virtual host, empty meaning "/".
    management_vhost = unquote(management.path.rsplit("/", 1)[-1]) or "/"
    amqp_vhost = unquote(urlsplit(_worker_secret()["RABBITMQ_URL"]).path[1:]) or "/"
    assert management_vhost == amqp_vhost


def test_pdb_selects_the_deployments_pods() -> None:
    """The PodDisruptionBudget and the Deployment select the same pods, those of the template."""
    deployment = _one("Deployment")["spec"]
    selector = deployment["selector"]["matchLabels"]
    assert selector.items() <= deployment["template"]["metadata"]["labels"].items()
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"] == {"matchLabels": selector}
    assert pdb["maxUnavailable"] == 1
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def _peak_rss_mb() -> float:
    """The highest peak RSS of a worker case in the README's benchmark table."""
    lines = README.read_text(encoding="utf-8").splitlines()
    header = next(line for line in lines if "peak RSS MB" in line)
    column = re.split(r"\s{2,}", header.strip()).index("peak RSS MB")
    peaks: list[float] = []
    for line in lines[lines.index(header) + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if not re.match(r"\(\w\) worker", cells[0]):
            if peaks:
                break
            continue
        peaks += [float(value) for value in cells[column].split("/")]
    assert peaks, "no worker case in the README's benchmark table"
    return max(peaks)


def test_resources_leave_headroom_over_the_measured_rss() -> None:
    """The memory request is at least 1.5 times the benchmark's peak RSS, the limit above it,
    and the CPU limit one core (the worker runs one event loop)."""
    resources = _container()["resources"]
    peak = _peak_rss_mb() * 2**20
    requested = _bytes(resources["requests"]["memory"])
    assert requested >= RSS_HEADROOM * peak, (requested, peak)
    assert _bytes(resources["limits"]["memory"]) >= 2 * requested
    assert resources["limits"]["cpu"] == "1"


def test_pod_runs_the_image_as_its_user_with_its_command() -> None:
    """The pod runs as the image's non-root user, with the image's command and a locked-down
    container, and the image tag is the project's version."""
    _, stages = read_dockerfile(DOCKERFILE)
    runtime = stages[-1]
    uid, gid = runtime.last("USER").arguments.split(":")
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(uid),
        int(gid),
    )
    container = _container()
    assert "command" not in container
    assert container["args"] == runtime.last("CMD").exec_form()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert container["image"].rpartition(":")[2] == project["version"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_kustomization_applies_everything_but_the_secrets() -> None:
    """kustomization.yaml lists every manifest except secret.yaml, which is never re-applied over
    the real Secrets, and renames the worker image."""
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    image = _container()["image"].rpartition(":")[0]
    assert [i["name"] for i in kustomization["images"]] == [image]
    assert kustomization["images"][0]["newTag"] == _container()["image"].rpartition(":")[2]


def test_secret_templates_carry_no_real_password() -> None:
    """Every password in the Secret templates is the CHANGE_ME placeholder."""
    for document in _documents():
        if document["kind"] != "Secret":
            continue
        for key, value in document["stringData"].items():
            password = urlsplit(value).password if "://" in value else None
            assert password in (None, "CHANGE_ME"), key
