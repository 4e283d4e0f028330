"""docker-compose.yml and .env.example start our entry points with settings that validate.

They are read through the test harness (tests/devstack.py), which parses them the way the
integration tests start the stack; the harness itself is not product code and is not tested.
"""

from __future__ import annotations

from pathlib import Path

from modules.pipeline.settings import ENV_NAMES, load_settings
from tests.devstack import (
    COMPOSE_FILE,
    ENV_FILE,
    compose_command,
    compose_services,
    read_env_file,
)

MCAAS_SERVICES = ("api", "worker", "flower")


def test_compose_has_the_services_and_one_env_file() -> None:
    services = compose_services()
    assert set(services) == {"api", "worker", "flower", "redis", "moto"}
    for name in MCAAS_SERVICES:
        assert services[name]["env_file"] == ".env.example", name
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile", name
    assert Path(COMPOSE_FILE).parent.joinpath("docker", "Dockerfile").is_file()


def test_compose_commands_start_our_entry_points() -> None:
    assert compose_command("api")[:2] == ["uvicorn", "api.main:app"]
    worker = compose_command("worker")
    assert worker[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    assert "--concurrency=1" in worker
    assert compose_command("moto")[0] == "moto_server"


def test_env_file_holds_only_known_settings_and_they_validate() -> None:
    env = read_env_file(ENV_FILE)
    ours = {name for name in env if name.startswith("MCAAS_")} | {"MODEL_BUCKET", "REDIS_URL"}
    assert ours <= set(ENV_NAMES.values()), ours - set(ENV_NAMES.values())
    settings = load_settings(**{name: env[name] for name in ours})
    assert settings.dispatcher == "celery"
    assert settings.missing("api") == [] and settings.missing("worker") == []
    assert settings.visibility_timeout_s > settings.task_time_limit_s
