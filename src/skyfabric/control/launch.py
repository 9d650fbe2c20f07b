"""Launch specs for a plan: the files that start each pool on schedulers that already exist.

skyfabric runs no cluster manager of its own. For each pool of a plan it writes a SkyPilot service YAML
(``sky serve up``: one per provider/region pool, with the accelerator, the image and the ``vllm serve``
command of the right build — CUDA, TPU or Neuron) and, as the alternative, Kubernetes manifests
(Deployment with a readiness probe, Service, PodDisruptionBudget). For the gateway itself it writes one
SkyPilot task per provider, so the front door runs in more than one cloud behind health-checked DNS
(docs/planning.md walks through the DNS side step by step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from skyfabric.control.plan import SERVICE_PORT, SERVICE_PORT_NAME, Offer, Plan, service_name

PORT = SERVICE_PORT


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people and kubectl: no ``&id001`` anchors where a mapping appears twice."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _dump(data: object) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


@dataclass(frozen=True, slots=True)
class Hardware:
    """How one replica of an accelerator kind is asked for, and how vLLM is run on it."""

    sky_accelerators: str | None  # SkyPilot `accelerators` (None: by instance type)
    sky_instance_type: str | None
    k8s_resource: str  # the extended resource a pod requests
    k8s_count: int
    k8s_node_selector: dict[str, str]
    image: str
    tensor_parallel: int
    setup: str = ""


HARDWARE: dict[str, Hardware] = {
    "nvidia-h100": Hardware("H100:8", None, "nvidia.com/gpu", 8, {}, "vllm/vllm-openai:latest", 8),
    "nvidia-h200": Hardware("H200:8", None, "nvidia.com/gpu", 8, {}, "vllm/vllm-openai:latest", 8),
    "nvidia-b200": Hardware("B200:8", None, "nvidia.com/gpu", 8, {}, "vllm/vllm-openai:latest", 8),
    "nvidia-a100": Hardware("A100-80GB:8", None, "nvidia.com/gpu", 8, {}, "vllm/vllm-openai:latest", 8),
    "nvidia-l4": Hardware("L4:8", None, "nvidia.com/gpu", 8, {}, "vllm/vllm-openai:latest", 8),
    "nvidia-a10g": Hardware("A10G:8", None, "nvidia.com/gpu", 8, {}, "vllm/vllm-openai:latest", 8),
    # vLLM's TPU build (the vllm-tpu wheel / image) on a single-host 8-chip slice.
    "tpu-v5e": Hardware(
        "tpu-v5litepod-8",
        None,
        "google.com/tpu",
        8,
        {
            "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
            "cloud.google.com/gke-tpu-topology": "2x4",
        },
        "vllm/vllm-tpu:latest",
        8,
        "pip install vllm-tpu",
    ),
    "tpu-v6e": Hardware(
        "tpu-v6e-8",
        None,
        "google.com/tpu",
        8,
        {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice", "cloud.google.com/gke-tpu-topology": "2x4"},
        "vllm/vllm-tpu:latest",
        8,
        "pip install vllm-tpu",
    ),
    # vLLM's Neuron build (the vllm-neuron plug-in on the Neuron DLAMI / Deep Learning Container).
    "trainium1": Hardware(
        None,
        "trn1.32xlarge",
        "aws.amazon.com/neuron",
        16,
        {"node.kubernetes.io/instance-type": "trn1.32xlarge"},
        "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:latest",
        32,
        "pip install vllm-neuron",
    ),
    "trainium2": Hardware(
        None,
        "trn2.48xlarge",
        "aws.amazon.com/neuron",
        16,
        {"node.kubernetes.io/instance-type": "trn2.48xlarge"},
        "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:latest",
        64,
        "pip install vllm-neuron",
    ),
    "inferentia2": Hardware(
        None,
        "inf2.48xlarge",
        "aws.amazon.com/neuron",
        12,
        {"node.kubernetes.io/instance-type": "inf2.48xlarge"},
        "public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:latest",
        24,
        "pip install vllm-neuron",
    ),
}


def hardware(offer: Offer) -> Hardware:
    try:
        return HARDWARE[offer.accelerator]
    except KeyError:
        raise ValueError(f"no launch recipe for accelerator {offer.accelerator!r}") from None


def vllm_command(offer: Offer, hf_model: str) -> str:
    """The ``vllm serve`` line for the pool's build (the same CLI on CUDA, TPU and Neuron)."""
    hw = hardware(offer)
    return (
        f"vllm serve {hf_model} --host 0.0.0.0 --port {PORT} --tensor-parallel-size {hw.tensor_parallel} "
        f"--max-num-seqs {offer.concurrency} --served-model-name {hf_model}"
    )


def skypilot_service(offer: Offer, replicas: int, hf_model: str) -> dict[str, Any]:
    """A SkyServe service YAML (as a mapping) for one pool: ``sky serve up <file> -n <service>``."""
    hw = hardware(offer)
    resources: dict[str, Any] = {"infra": f"{offer.provider}/{offer.region}", "ports": PORT}
    if hw.sky_accelerators:
        resources["accelerators"] = hw.sky_accelerators
    if hw.sky_instance_type:
        resources["instance_type"] = hw.sky_instance_type
    if offer.accelerator.startswith("tpu-"):
        runtime = "v2-alpha-tpuv6e" if offer.accelerator == "tpu-v6e" else "v2-alpha-tpuv5-lite"
        resources["accelerator_args"] = {"runtime_version": runtime}
    elif offer.accelerator.startswith("nvidia-"):
        resources["image_id"] = f"docker:{hw.image}"
    spec: dict[str, Any] = {
        "name": service_name(offer),
        "service": {
            "readiness_probe": {"path": "/health", "initial_delay_seconds": 1800},
            "replicas": replicas,
        },
        "resources": resources,
        "envs": {"MODEL": hf_model, "HF_TOKEN": ""},
        "run": vllm_command(offer, "$MODEL"),
    }
    if hw.setup and not offer.accelerator.startswith("nvidia-"):
        spec["setup"] = hw.setup
    return spec


def kubernetes_manifests(offer: Offer, replicas: int, hf_model: str, namespace: str) -> list[dict[str, Any]]:
    """Deployment (readiness probe on /health), Service and PodDisruptionBudget for one pool."""
    hw = hardware(offer)
    name = service_name(offer)
    labels = {
        "app.kubernetes.io/name": name,
        "skyfabric.io/provider": offer.provider,
        "skyfabric.io/pool": offer.pool,
    }
    selector = {"app.kubernetes.io/name": name}
    container: dict[str, Any] = {
        "name": "vllm",
        "image": hw.image,
        "command": ["/bin/sh", "-c"],
        "args": [vllm_command(offer, hf_model)],
        "ports": [{"name": SERVICE_PORT_NAME, "containerPort": PORT}],
        "env": [
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}},
            }
        ],
        "resources": {"limits": {hw.k8s_resource: hw.k8s_count}, "requests": {hw.k8s_resource: hw.k8s_count}},
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": PORT},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": PORT},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
    }
    pod_spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 60}
    if hw.k8s_node_selector:
        pod_spec["nodeSelector"] = dict(hw.k8s_node_selector)
    meta = {"name": name, "namespace": namespace, "labels": labels}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": dict(selector)},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "type": "LoadBalancer",
                "selector": dict(selector),
                "ports": [{"name": SERVICE_PORT_NAME, "port": PORT, "targetPort": SERVICE_PORT_NAME}],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta,
            # voluntary disruptions (node drains, upgrades) take at most one replica at a time
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
        },
    ]


def gateway_task(provider: str, region: str, fleet_file: str) -> dict[str, Any]:
    """One gateway instance in ``provider/region``: ``sky launch`` it in every provider of the plan."""
    return {
        "name": f"skyfabric-gateway-{provider}",
        "resources": {"infra": f"{provider}/{region}", "cpus": "8+", "ports": 8080},
        "workdir": ".",  # the skyfabric checkout `sky launch` is run from
        "file_mounts": {"/etc/skyfabric/fleet.yaml": fleet_file},
        "setup": "pip install .",
        "run": "skyfabric serve --config /etc/skyfabric/fleet.yaml --host 0.0.0.0 --port 8080 --workers 4",
    }


def write_specs(
    result: Plan, hf_model: str, out: Path, *, namespace: str = "skyfabric", fleet_file: str = "fleet.yaml"
) -> list[Path]:
    """Write every launch file of a plan under ``out``; returns the paths written."""
    written: list[Path] = []
    (out / "skypilot").mkdir(parents=True, exist_ok=True)
    (out / "kubernetes").mkdir(parents=True, exist_ok=True)
    (out / "gateway").mkdir(parents=True, exist_ok=True)
    gateway_regions: dict[str, str] = {}
    for offer, count in zip(result.offers, result.replicas, strict=True):
        if count <= 0:
            continue
        gateway_regions.setdefault(offer.provider, offer.region)
        name = service_name(offer)
        sky = out / "skypilot" / f"{name}.yaml"
        sky.write_text(_dump(skypilot_service(offer, count, hf_model)))
        kube = out / "kubernetes" / f"{name}.yaml"
        kube.write_text(
            yaml.dump_all(
                kubernetes_manifests(offer, count, hf_model, namespace), Dumper=_Dumper, sort_keys=False
            )
        )
        written += [sky, kube]
    for provider, region in gateway_regions.items():
        path = out / "gateway" / f"gateway-{provider}.yaml"
        path.write_text(_dump(gateway_task(provider, region, fleet_file)))
        written.append(path)
    return written
