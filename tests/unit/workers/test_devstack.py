"""docker-compose.yml, .env.example and the process stack that stands in for compose agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.pipeline.settings import ENV_NAMES, load_settings
from workers.devstack import (
    COMPOSE_FILE,
    ENV_FILE,
    compose_command,
    compose_services,
    local_argv,
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


def test_local_argv_runs_compose_commands_on_localhost() -> None:
    argv = local_argv(["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"], port=9)
    assert Path(argv[0]).name == "uvicorn"
    assert argv[1:] == ["api.main:app", "--host", "127.0.0.1", "--port", "9"]
    assert local_argv(["celery", "flower", "--port=5555"], port=7)[1:] == ["flower", "--port=7"]


def test_env_file_parser_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("# comment\n\nA=1\nB = two words \n")
    assert read_env_file(path) == {"A": "1", "B": "two words"}
    path.write_text("NOT A PAIR\n")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        read_env_file(path)
