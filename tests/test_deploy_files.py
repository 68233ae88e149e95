"""The Dockerfile and docker-compose.yml run only `afif` command lines that the CLI parser
accepts, and only subcommands that the integration tests run for real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
INTEGRATION_TESTS = REPO / "tests" / "integration"


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _dockerfile_instruction(name: str) -> list[str]:
    """The exec-form (JSON array) argument of the last `name` instruction."""
    text = (REPO / "Dockerfile").read_text()
    found = re.findall(rf"^{name}\s+(\[.*\])\s*$", text, flags=re.MULTILINE)
    assert found, f"Dockerfile has no exec-form {name}"
    return json.loads(found[-1])


def _afif_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `afif`) for every afif process the deploy files start."""
    entrypoint = _dockerfile_instruction("ENTRYPOINT")
    assert entrypoint == ["afif"], "the image's entrypoint must be the afif command"
    lines = [("Dockerfile CMD", _dockerfile_instruction("CMD"))]

    compose = _compose()
    afif_services = [
        (name, spec) for name, spec in compose["services"].items()
        if spec.get("image", "").startswith("afif") or "build" in spec
    ]
    assert afif_services, "docker-compose.yml runs no afif service"
    for name, spec in afif_services:
        command = spec.get("command")
        assert isinstance(command, list), f"service {name}: use an exec-form command list"
        lines.append((f"compose service {name}", command))
    return lines


def _exercised_subcommands() -> set[str]:
    """Subcommands the integration tests run as real processes (the `afif(...)` and
    `spawn(...)` helpers, `"service.cli", "<sub>"` argv lists)."""
    text = "\n".join(p.read_text() for p in INTEGRATION_TESTS.glob("*.py"))
    found = set(re.findall(r'(?:afif|spawn)\(\s*"([a-z-]+)"', text))
    found |= set(re.findall(r'"service\.cli",\s*"([a-z-]+)"', text))
    return found


@pytest.mark.parametrize("where, argv", _afif_command_lines())
def test_every_deploy_command_parses(where: str, argv: list[str]) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports errors by exiting
        pytest.fail(f"{where}: `afif {' '.join(argv)}` is rejected by the CLI ({exc})")
    assert args.command == argv[0]


def test_deploy_subcommands_are_exercised_by_integration_tests() -> None:
    used = {argv[0] for _, argv in _afif_command_lines()}
    exercised = _exercised_subcommands()
    assert used <= exercised, f"not run by tests/integration: {sorted(used - exercised)}"


def test_compose_wires_the_stack_together() -> None:
    services = _compose()["services"]
    for name in ("postgres", "redis", "migrate", "api", "worker", "reconciler"):
        assert name in services, f"docker-compose.yml lacks the {name} service"

    # Every afif process shares the store volume and talks to the same database and Redis.
    afif_names = [n for n, s in services.items() if "build" in s or "afif" in s.get("image", "")]
    for name in afif_names:
        spec = services[name]
        env = spec["environment"]
        assert env["DATABASE_URL"].startswith("postgresql"), name
        assert env["REDIS_URL"].startswith("redis://redis:"), name
        assert any(v.endswith(":" + env["AFIF_DATA_DIR"]) for v in spec["volumes"]), name

    # The API and the workers start only once the one-shot migration has succeeded.
    for name in ("api", "worker", "reconciler"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    assert services["worker"]["deploy"]["replicas"] >= 2


def test_only_the_api_container_is_health_checked_on_its_port() -> None:
    services = _compose()["services"]
    for name, spec in services.items():
        if not ("build" in spec or "afif" in spec.get("image", "")):
            continue
        check = spec.get("healthcheck", {})
        if spec["command"][0] != "api":
            # The image's HEALTHCHECK would probe :8000, where nothing listens.
            assert check.get("disable") is True, f"{name}: healthcheck must be disabled"
            continue
        port = spec["command"][spec["command"].index("--port") + 1]
        assert not check.get("disable"), name
        assert f"127.0.0.1:{port}/healthz" in " ".join(check["test"]), name


def test_image_pins_the_torch_the_tests_run() -> None:
    import torch

    text = (REPO / "Dockerfile").read_text()
    pinned = re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, flags=re.MULTILINE)
    assert pinned == [torch.__version__.split("+")[0]], (pinned, torch.__version__)
    assert 'pip install "torch==${TORCH_VERSION}"' in text
