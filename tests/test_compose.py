"""The compose files users run: parsed and checked here, since no Docker engine runs on these machines."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from idios.__main__ import build_parser
from idios.settings import Settings
from tests.conftest import ROOT

COMPOSE = ROOT / "compose"
FILES = sorted(COMPOSE.glob("docker-compose.*.yml"))
SETTING_VARS = {f"IDIOS_{f.name.upper()}" for f in fields(Settings)}
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data.get("services"), path
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def ports_of(data: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for s in data["services"].values() for p in s.get("ports", [])}


def test_the_expected_files_exist() -> None:
    names = {p.name for p in FILES}
    assert names == {"docker-compose.dev.yml", "docker-compose.minimal.yml", "docker-compose.frontend.yml",
                     "docker-compose.milvus.yml", "docker-compose.worker.yml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_services_are_pinned_healthy_and_use_real_settings(path: Path) -> None:
    data = load(path)
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    declared_volumes = set((data.get("volumes") or {}).keys())
    for name, svc in data["services"].items():
        image = svc.get("image", "")
        assert image or "build" in svc, name
        if not image.startswith("idios:"):
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
        if name != "attu":
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        for var in env_of(svc):
            if var.startswith("IDIOS_"):
                assert var in SETTING_VARS, f"{name}: {var} is not a setting"
        if image.startswith("idios:"):
            assert svc["command"][0] in commands, f"{name}: unknown command {svc['command']}"
            assert "../models:/app/models:ro" in svc.get("volumes", []), f"{name} must mount the models"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for var, value in env_of(svc).items():
            if re.search("PASS|SECRET|TOKEN|KEY", var):
                assert value == "" or INTERPOLATION.search(value), f"{name}: {var} must come from the environment"


def test_ports_per_deployment() -> None:
    by_name = {p.name: load(p) for p in FILES}
    assert {4213, 5672, 15672, 19530} <= ports_of(by_name["docker-compose.dev.yml"])
    assert ports_of(by_name["docker-compose.minimal.yml"]) == {4213}
    assert ports_of(by_name["docker-compose.frontend.yml"]) == {4213, 5672, 15672}
    assert 19530 in ports_of(by_name["docker-compose.milvus.yml"])
    assert ports_of(by_name["docker-compose.worker.yml"]) == set()


def test_workers_can_scale() -> None:
    for path in FILES:
        worker = load(path)["services"].get("worker")
        if worker:  # --scale worker=N needs no fixed name and no host port
            assert "container_name" not in worker and not worker.get("ports")
            assert worker["command"] == ["worker"]
            env = env_of(worker)
            assert "IDIOS_AMQP_URL" in env and "IDIOS_MILVUS_URI" in env


def test_every_required_variable_is_in_the_env_example() -> None:
    example = (COMPOSE / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    for path in FILES:
        for var in INTERPOLATION.findall(path.read_text()):
            assert var in documented or var in SETTING_VARS, f"{path.name}: ${{{var}}} is not in .env.example"


def test_dockerfile_runs_the_cli_without_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "idios"]' in text
    runtime = [line.split("#")[0].strip() for line in (ROOT / "requirements/runtime.txt").read_text().splitlines()]
    assert "requirements/runtime.txt" in text and not any(line.startswith("torch") for line in runtime)
    assert "IDIOS_HOST=0.0.0.0" in text and "EXPOSE 4213" in text
