"""Launch specs: every pool gets SkyPilot YAML and Kubernetes manifests that the schemas accept."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from skyfabric.cli import cli
from skyfabric.control.launch import kubernetes_manifests, skypilot_service
from skyfabric.control.plan import Offer, Requirements, plan, save_plan

OFFERS = [
    Offer("aws", "us-east-1", "trainium2", "vllm-neuron", 44.7, 120.0, concurrency=128),
    Offer("gcp", "us-central1", "tpu-v6e", "vllm-tpu", 21.6, 127.0),
    Offer("azure", "eastus", "nvidia-h100", "vllm", 98.3, 84.2),
]


def k8s_valid(doc: dict) -> None:
    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_manifests_pass_the_kubernetes_openapi_schemas() -> None:
    for offer in OFFERS:
        docs = kubernetes_manifests(offer, 3, "meta-llama/Llama-2-70b-chat-hf", "skyfabric")
        assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]
        for doc in docs:
            k8s_valid(doc)
        deployment = docs[0]
        assert deployment["spec"]["replicas"] == 3
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert "vllm serve meta-llama/Llama-2-70b-chat-hf" in container["args"][0]
        assert docs[2]["spec"]["maxUnavailable"] == 1


def test_the_validator_rejects_a_broken_manifest() -> None:
    """The check above can fail: a mistyped field is refused."""
    doc = kubernetes_manifests(OFFERS[2], 2, "m", "ns")[0]
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_valid(doc)


def test_skypilot_service_per_build() -> None:
    neuron, tpu, gpu = (skypilot_service(o, 2, "m") for o in OFFERS)
    assert gpu["resources"]["accelerators"] == "H100:8"
    assert gpu["resources"]["image_id"] == "docker:vllm/vllm-openai:latest"
    assert tpu["resources"]["accelerators"] == "tpu-v6e-8"
    assert tpu["setup"] == "pip install vllm-tpu"
    assert neuron["resources"]["instance_type"] == "trn2.48xlarge"
    assert neuron["setup"] == "pip install vllm-neuron"
    for spec, offer in zip((neuron, tpu, gpu), OFFERS, strict=True):
        assert spec["service"]["replicas"] == 2
        assert spec["resources"]["infra"] == f"{offer.provider}/{offer.region}"
        assert spec["run"].startswith("vllm serve $MODEL")


def test_cli_launch_spec_writes_a_file_set_per_pool_and_gateways(tmp_path: Path) -> None:
    result = plan(OFFERS, Requirements(200.0))
    save_plan(result, "llama", tmp_path / "plan.yaml")
    out = CliRunner().invoke(
        cli, ["launch-spec", str(tmp_path / "plan.yaml"), "--hf-model", "m/x", "--out", str(tmp_path / "o")]
    )
    assert out.exit_code == 0, out.output
    used = [o for o, x in zip(result.offers, result.replicas, strict=True) if x]
    assert len(list((tmp_path / "o" / "skypilot").glob("*.yaml"))) == len(used)
    for path in (tmp_path / "o" / "kubernetes").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            k8s_valid(doc)
    gateways = sorted(p.name for p in (tmp_path / "o" / "gateway").glob("*.yaml"))
    assert gateways == sorted(f"gateway-{p}.yaml" for p in {o.provider for o in used})
    assert len(gateways) >= 2  # the front door in more than one provider
