"""Settings: read from the environment once, errors name the variable, services built from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modules.pipeline.settings import (
    Settings,
    SettingsError,
    build_services,
    get_settings,
    load_settings,
    parse_api_keys,
)
from modules.storage.artifacts import LocalStore, S3Store
from modules.storage.jobs import DynamoJobStore, SqliteJobStore
from modules.storage.steplog import DynamoStepLog, SqliteStepLog, TeeStepLog


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    from modules.pipeline.settings import ENV_NAMES

    for env_name in ENV_NAMES.values():
        monkeypatch.delenv(env_name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_values_come_from_upper_case_env_names(clean_env) -> None:
    clean_env.setenv("MCAAS_STORE_URL", "s3://bucket-a")
    clean_env.setenv("MCAAS_MAX_UPLOAD_MB", "5")
    clean_env.setenv("MCAAS_DEV_MODE", "true")
    clean_env.setenv("REDIS_URL", "redis://r:6379/3")
    settings = get_settings()
    assert settings is get_settings()  # read once
    assert settings.store_url == "s3://bucket-a"
    assert settings.max_upload_bytes == 5 * 1024 * 1024
    assert settings.dev_mode is True
    assert settings.redis_url == "redis://r:6379/3"
    assert settings.trust_pickle is False and settings.dispatcher == "inline"


def test_a_bad_value_names_its_variable(clean_env) -> None:
    clean_env.setenv("MCAAS_MAX_UPLOAD_MB", "lots")
    clean_env.setenv("MCAAS_DISPATCHER", "carrier-pigeon")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "MCAAS_MAX_UPLOAD_MB" in str(caught.value)
    assert "MCAAS_DISPATCHER" in str(caught.value)


def test_each_role_names_what_it_misses(clean_env) -> None:
    settings = load_settings(dispatcher="celery", step_log="dynamodb+csv")
    with pytest.raises(SettingsError) as caught:
        settings.require("api")
    message = str(caught.value)
    for name in (
        "MCAAS_STORE_URL",
        "MCAAS_JOBS_TABLE",
        "MCAAS_STEPS_TABLE",
        "MCAAS_CSV_LOG",
        "MCAAS_API_KEYS",
        "REDIS_URL",
    ):
        assert name in message
    worker = load_settings(dispatcher="ecs", model_bucket="b", jobs_table="j", csv_log="x.csv")
    assert worker.missing("worker") == [
        "MCAAS_ECS_CLUSTER (MCAAS_DISPATCHER=ecs)",
        "MCAAS_ECS_TASK_DEFINITION (MCAAS_DISPATCHER=ecs)",
        "MCAAS_ECS_SUBNETS (MCAAS_DISPATCHER=ecs)",
        "MCAAS_ECS_SECURITY_GROUPS (MCAAS_DISPATCHER=ecs)",
    ]
    # Standalone ECS mode needs only its step log; the bucket comes with each task.
    assert load_settings(step_log="dynamodb", steps_table="t").missing("ecs") == []


def test_api_keys_parse_without_echoing_keys(clean_env) -> None:
    assert parse_api_keys("key-one-111:alice, key-two-222:bob") == {
        "key-one-111": "alice",
        "key-two-222": "bob",
    }
    for text, problem in [
        ("short:alice", "8+ characters"),
        ("no-colon-secret-1", "key:user_id"),
        ("secret-key-1:alice,secret-key-1:bob", "repeats a key"),
        ("secret-key-1:../bob", "invalid user id"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)) as caught:
            parse_api_keys(text)
        assert "secret-key-1" not in str(caught.value) and "no-colon" not in str(caught.value)
    with pytest.raises(SettingsError, match="MCAAS_API_KEYS"):
        load_settings(api_keys="short:alice")
    assert "key-one" not in repr(load_settings(api_keys="key-one-111:alice"))


def test_embedded_services(clean_env, tmp_path: Path) -> None:
    settings = load_settings(
        store_url=str(tmp_path / "store"), jobs_db=tmp_path / "j.sqlite", csv_log=tmp_path / "s.csv"
    )
    store, log, jobs = build_services(settings)
    assert isinstance(store, LocalStore)
    assert isinstance(log, SqliteStepLog)
    assert isinstance(jobs, SqliteJobStore)


def test_aws_services(clean_env, tmp_path: Path) -> None:
    settings = load_settings(
        model_bucket="models",
        jobs_table="jobs-t",
        steps_table="steps-t",
        step_log="dynamodb+csv",
        csv_log=tmp_path / "s.csv",
        aws_region="eu-west-1",
    )
    assert settings.artifact_store_url == "s3://models"
    store, log, jobs = build_services(settings)
    assert isinstance(store, S3Store) and store.bucket == "models" and store.region == "eu-west-1"
    assert isinstance(log, TeeStepLog)
    assert isinstance(log.primary, DynamoStepLog) and log.primary.table_name == "steps-t"
    assert log.primary.overflow_store is store
    assert [type(o) for o in log.others] == [SqliteStepLog]
    assert isinstance(jobs, DynamoJobStore) and jobs.table_name == "jobs-t"


def test_record_ttl_days_reaches_the_dynamodb_stores(clean_env, tmp_path: Path) -> None:
    clean_env.setenv("MCAAS_RECORD_TTL_DAYS", "30")
    settings = load_settings(model_bucket="models", jobs_table="j", steps_table="s")
    assert settings.record_ttl_days == 30
    _, log, jobs = build_services(settings.model_copy(update={"step_log": "dynamodb"}))
    assert isinstance(log, DynamoStepLog) and log.ttl_days == 30
    assert isinstance(jobs, DynamoJobStore) and jobs.ttl_days == 30
    assert load_settings().record_ttl_days == 30
    clean_env.setenv("MCAAS_RECORD_TTL_DAYS", "-1")
    with pytest.raises(SettingsError, match="MCAAS_RECORD_TTL_DAYS"):
        load_settings()
