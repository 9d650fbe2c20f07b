"""Validate generated SkyPilot YAML with SkyPilot's own schemas, offline: for any launch-spec output.

The test suite does the same on the worked example (tests/control/test_launch_skypilot.py). SkyPilot is
installed into the project's venv by the Makefile (without its click<8.2 pin, which no resolver can
combine with transformers' huggingface_hub; see there):

    python bench/validate_skypilot.py OUT/skypilot OUT/gateway  # launch-spec --out OUT

It checks each file against ``sky.utils.schemas.get_task_schema()`` (which includes ``service``), the
service section against ``get_service_schema()`` and SkyServe's own ``SkyServiceSpec.from_yaml_config``,
exactly the checks ``sky serve up`` / ``sky launch`` run before touching a cloud.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from sky.serve.service_spec import SkyServiceSpec
from sky.utils import common_utils, schemas


def main(dirs: list[str]) -> int:
    bad = 0
    count = 0
    for d in dirs:
        for path in sorted(Path(d).glob("*.yaml")):
            config = yaml.safe_load(path.read_text())
            count += 1
            try:
                common_utils.validate_schema(
                    config, schemas.get_task_schema(), f"{path}: invalid task YAML: "
                )
                if "service" in config:
                    common_utils.validate_schema(
                        config["service"], schemas.get_service_schema(), f"{path}: invalid service: "
                    )
                    SkyServiceSpec.from_yaml_config(config["service"])
                common_utils.validate_schema(
                    config["resources"], schemas.get_resources_schema(), f"{path}: invalid resources: "
                )
            except Exception as exc:  # report every file, then fail
                bad += 1
                print(f"INVALID {path}: {exc}")
            else:
                print(f"ok {path}")
    print(f"{count - bad}/{count} SkyPilot files valid")
    return 1 if bad or not count else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
