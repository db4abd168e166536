"""The Kubernetes manifests (``deploy/k8s``) validate offline against the Kubernetes schemas and agree
with each other, with the compose file's images and with the service's probes."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from harness.launcher import REPO_ROOT
from tests.helpers import BENTO_USER_UID

K8S = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml")


def resources(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_resources() -> list[dict]:
    return [resource for path in manifest_files() for resource in resources(path)]


def find(kind: str, name: str) -> dict:
    return next(r for r in all_resources() if r["kind"] == kind and r["metadata"]["name"] == name)


# KServe's PredictorSpec: these fields (ComponentExtensionSpec, from the KServe API reference) beside an
# inline core/v1 PodSpec; what is left after removing them must validate as a PodSpec.
KSERVE_COMPONENT_FIELDS = frozenset(
    {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout", "canaryTrafficPercent"}
    | {"logger", "batcher", "labels", "annotations", "deploymentStrategy", "model", "workerSpec"}
)


def kserve_pod_spec(inference_service: dict) -> dict:
    return {k: v for k, v in inference_service["spec"]["predictor"].items() if k not in KSERVE_COMPONENT_FIELDS}


def pod_specs() -> list[dict]:
    specs = []
    for resource in all_resources():
        spec = resource.get("spec", {})
        if resource["kind"] == "InferenceService":
            specs.append(kserve_pod_spec(resource))
        elif resource["kind"] == "CronJob":
            specs.append(spec["jobTemplate"]["spec"]["template"]["spec"])
        elif "template" in spec:
            specs.append(spec["template"]["spec"])
    return specs


@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: str(path.relative_to(K8S)))
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(path):
    for resource in resources(path):
        if resource["kind"] == "InferenceService":  # a KServe custom resource: its pod part, below
            continue
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_kserve_inference_service_is_a_v2_custom_predictor_whose_pod_validates():
    service = find("InferenceService", "digits")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(service) == {"apiVersion", "kind", "metadata", "spec"} and set(service["spec"]) == {"predictor"}
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "digits-predictor"}, "spec": kserve_pod_spec(service)}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    config = find("ConfigMap", "mnist-config")["data"]
    assert ports == {"http1": 3000, "grpc": int(config["GRPC_PORT"])}
    deployment = find("Deployment", "digits")["spec"]["template"]["spec"]
    assert container["envFrom"] == deployment["containers"][0]["envFrom"]  # the same settings as the Deployment's pods


def test_the_validator_rejects_a_broken_manifest():
    deployment = copy.deepcopy(find("Deployment", "digits"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"name": "http"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(find("Deployment", "digits"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", sorted(K8S.rglob("kustomization.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_each_kustomization_lists_exactly_the_manifests_beside_it(kustomization):
    listed = yaml.safe_load(kustomization.read_text())["resources"]
    beside = sorted(path.name for path in kustomization.parent.glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(listed) == beside


def test_secret_and_config_references_exist():
    secret_keys = {
        line.split("=", 1)[0] for line in (K8S / "secrets.env.example").read_text().splitlines() if re.match(r"^[A-Z_]+=", line)
    }
    config_keys = set(find("ConfigMap", "mnist-config")["data"])
    for spec in pod_specs():
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] == "mnist-config"
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "mnist-secrets" and ref["key"] in secret_keys, variable
            text = " ".join(container.get("command", []))
            for name in re.findall(r"\$\{?(\w+)", text):
                assert name in config_keys | {"JOB_COMPLETION_INDEX", "TF_CONFIG"}, name


def test_the_service_deployment_probes_the_services_own_health_routes_and_is_guarded():
    deployment = find("Deployment", "digits")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(container["resources"]["limits"]) and {"cpu", "memory"} <= set(
        container["resources"]["requests"]
    )
    assert pod["terminationGracePeriodSeconds"] >= 30
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert find("PodDisruptionBudget", "digits")["spec"]["selector"]["matchLabels"] == labels
    assert find("Service", "digits")["spec"]["selector"] == labels
    hpa = find("HorizontalPodAutoscaler", "digits")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits"}
    assert hpa["minReplicas"] >= 2


def test_every_container_has_resources_and_runs_an_image_the_compose_file_makes():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    compose_images = {
        re.sub(r"^\$\{SERVICE_IMAGE:-(.*)\}$", r"\1", service.get("image", "")).split(":")[0] for service in compose.values()
    }
    kustomized = {image["name"] for image in yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]}
    for spec in pod_specs():
        for container in spec["containers"]:
            assert container["image"] in kustomized & compose_images, container["image"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]


def test_the_multi_worker_job_gives_each_pod_its_task_in_tf_config():
    job = find("Job", "train-mw")["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == 2 and job["backoffLimit"] == 0
    script = job["template"]["spec"]["containers"][0]["command"][-1]
    assert "training.strategy=multi_worker" in script and "${JOB_COMPLETION_INDEX}" in script
    workers = re.findall(r'\\"(train-mw-\d\.train-mw:\d+)\\"', script)
    assert workers == [f"train-mw-{index}.train-mw:12345" for index in range(job["completions"])]
    assert job["template"]["spec"]["subdomain"] == find("Service", "train-mw")["metadata"]["name"]


def test_every_pod_runs_as_its_images_non_root_user_without_privileges():
    users = {
        "mnist-pipeline": int(re.search(r"useradd .*--uid (\d+)", (REPO_ROOT / "Dockerfile").read_text()).group(1)),
        "mnist-mlflow": int(re.search(r"useradd .*--uid (\d+)", (REPO_ROOT / "mlflow" / "Dockerfile").read_text()).group(1)),
        "mnist-digits": BENTO_USER_UID,
    }
    for spec in pod_specs():
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            assert context["runAsUser"] == users[container["image"]], container["image"]
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
