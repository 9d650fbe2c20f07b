"""launch-spec's SkyPilot files pass SkyPilot's own schemas, offline, with the ``skypilot`` package itself.

These are the checks ``sky launch`` / ``sky serve up`` run on a YAML before touching a cloud: the task
schema (which includes ``service``), the resources schema, SkyServe's service schema and its
``SkyServiceSpec.from_yaml_config``, and the ``infra`` string parsed by SkyPilot's own parser into a
cloud SkyPilot knows. (``sky.Task.from_yaml_config`` goes further and, for an AWS instance type, fetches
SkyPilot's price catalogue from the network: not offline, so not here.) SkyPilot is installed by the
Makefile, see there for why not through pyproject.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from skyfabric.cli import cli
from skyfabric.control.launch import HARDWARE, gateway_task, skypilot_service
from skyfabric.control.plan import Offer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "three-clouds.offers.yaml"


@pytest.fixture(scope="module")
def sky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """SkyPilot's validation entry points; importing SkyPilot writes under ~/.sky, so HOME is a temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        from sky.serve.service_spec import SkyServiceSpec
        from sky.utils import common_utils, infra_utils, registry, schemas

        yield SimpleNamespace(
            SkyServiceSpec=SkyServiceSpec,
            common_utils=common_utils,
            infra_utils=infra_utils,
            registry=registry,
            schemas=schemas,
        )


def validate(sky: SimpleNamespace, config: dict[str, Any], where: str = "") -> None:
    """Raise (ValueError, as SkyPilot does) unless SkyPilot would accept ``config`` as a task/service."""
    sky.common_utils.validate_schema(config, sky.schemas.get_task_schema(), f"{where}: invalid task: ")
    sky.common_utils.validate_schema(
        config["resources"], sky.schemas.get_resources_schema(), f"{where}: invalid resources: "
    )
    infra = sky.infra_utils.InfraInfo.from_str(config["resources"]["infra"])
    sky.registry.CLOUD_REGISTRY.from_str(infra.cloud)  # a cloud SkyPilot knows, or ValueError
    if "service" in config:
        spec = sky.SkyServiceSpec.from_yaml_config(config["service"])
        assert spec.readiness_path == "/health"
        assert spec.min_replicas == config["service"]["replicas"] and spec.max_replicas is None  # fixed


def test_every_file_of_the_worked_example_passes_skypilots_schemas(
    sky: SimpleNamespace, tmp_path: Path
) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", str(EXAMPLE), "--plan-out", str(tmp_path / "plan.yaml")])
    assert out.exit_code == 0, out.output
    hf_model = "meta-llama/Llama-2-70b-chat-hf"
    args = [
        "launch-spec",
        str(tmp_path / "plan.yaml"),
        "--hf-model",
        hf_model,
        "--out",
        str(tmp_path / "launch"),
    ]
    out = runner.invoke(cli, args)
    assert out.exit_code == 0, out.output
    services = sorted((tmp_path / "launch" / "skypilot").glob("*.yaml"))
    gateways = sorted((tmp_path / "launch" / "gateway").glob("*.yaml"))
    # the worked example's plan: trn2 on aws, v6e on gcp, A100 on azure, and a gateway in each provider
    assert [p.stem for p in services] == [
        "sf-aws-us-east-1-trainium2",
        "sf-azure-eastus-nvidia-a100",
        "sf-gcp-us-central1-tpu-v6e",
    ]
    assert [p.stem for p in gateways] == ["gateway-aws", "gateway-azure", "gateway-gcp"]
    for path in services + gateways:
        config = yaml.safe_load(path.read_text())
        validate(sky, config, str(path))
        if path in services:
            assert config["name"] == path.stem  # `sky serve up -n` and discovery use this name


@pytest.mark.parametrize("accelerator", sorted(HARDWARE))
def test_every_accelerator_recipe_passes_skypilots_schemas(sky: SimpleNamespace, accelerator: str) -> None:
    engine = "vllm-tpu" if accelerator.startswith("tpu-") else "vllm"
    offer = Offer(
        "gcp" if accelerator.startswith("tpu-") else "aws", "us-east-1", accelerator, engine, 1.0, 1.0
    )
    validate(sky, skypilot_service(offer, 3, "meta-llama/Llama-2-70b-chat-hf"), accelerator)


def test_skypilot_refuses_broken_files(sky: SimpleNamespace) -> None:
    """The check above can fail: each of these mistakes is refused by SkyPilot's own code."""
    good = skypilot_service(Offer("azure", "eastus", "nvidia-a100", "vllm", 27.2, 32.1), 5, "m")
    validate(sky, good)

    def broken(edit: Any) -> dict[str, Any]:
        config = copy.deepcopy(good)
        edit(config)
        return config

    cases = {
        "unknown resources field": broken(lambda c: c["resources"].update(zone_pref="eastus-1")),
        "replicas not a number": broken(lambda c: c["service"].update(replicas="five")),
        "probe without a path": broken(lambda c: c["service"]["readiness_probe"].pop("path")),
        "replicas and a policy": broken(lambda c: c["service"].update(replica_policy={"min_replicas": 1})),
        "run not a string": broken(lambda c: c.update(run=["vllm", "serve"])),
        "a cloud SkyPilot does not know": broken(lambda c: c["resources"].update(infra="azur/eastus")),
        "an unknown top-level key": broken(lambda c: c.update(replicas=5)),
    }
    for what, config in cases.items():
        with pytest.raises(ValueError) as refused:
            validate(sky, config, what)
        assert "/sky/" in str(refused.traceback[-1].path), what  # raised by SkyPilot's code, not ours
    gateway = gateway_task("gcp", "us-central1", "fleet.yaml")
    validate(sky, gateway)
    gateway["file_mounts"] = "fleet.yaml"  # a mapping of remote path → local path
    with pytest.raises(ValueError, match="file_mounts"):
        validate(sky, gateway)
