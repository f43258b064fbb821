"""Settings refuse what the server cannot honour."""

import pytest
from pydantic import ValidationError

from settings import Settings


def test_only_databases_the_limiter_can_lock_in_are_accepted():
    for url in ("sqlite:///x.db", "postgresql+psycopg://app:secret@db.internal/classify", "postgresql://db/classify"):
        assert Settings(database_url=url).database_url == url
    for url in ("mysql://localhost/classify", "postgresql+asyncpg://db/classify", "classify.db"):
        with pytest.raises(ValidationError, match="DATABASE_URL must be sqlite"):
            Settings(database_url=url)


def test_redis_urls_must_name_a_redis_scheme():
    assert Settings(redis_url="redis://cache:6379/0").redis_url == "redis://cache:6379/0"
    with pytest.raises(ValidationError, match="REDIS_URL must be"):
        Settings(redis_url="cache:6379")


def test_model_threads_share_the_cores_by_default():
    settings = Settings(model_workers=1)
    assert settings.threads_per_worker >= 1
    assert Settings(model_workers=1, torch_threads=3).threads_per_worker == 3
