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


def test_a_refused_url_never_shows_its_password_and_postgres_scheme_is_understood():
    with pytest.raises(ValidationError) as refused:
        Settings(database_url="mysql://app:hunter2@db/classify")
    assert "hunter2" not in str(refused.value)
    assert Settings(database_url="postgres://app:pw@db/classify").database_url == "postgresql://app:pw@db/classify"


def test_redis_urls_must_name_a_redis_scheme():
    assert Settings(redis_url="redis://cache:6379/0").redis_url == "redis://cache:6379/0"
    with pytest.raises(ValidationError, match="REDIS_URL must be"):
        Settings(redis_url="cache:6379")


def test_the_queue_must_hold_the_largest_request():
    with pytest.raises(ValidationError, match="MAX_QUEUE=4 is below MAX_IMAGES_PER_REQUEST=16"):
        Settings(max_queue=4, max_images_per_request=16)
    assert Settings(max_queue=4, max_images_per_request=4).max_queue == 4


def test_onnxruntime_is_the_default_backend_when_installed():
    assert Settings().inference_backend == "onnxruntime"
    assert Settings(inference_backend="torch").inference_backend == "torch"
