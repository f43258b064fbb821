"""Settings refuse what the server cannot honour."""

import pytest
from pydantic import ValidationError

from settings import Settings


def test_only_sqlite_urls_are_accepted_until_the_limiter_can_lock_elsewhere():
    assert Settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"
    with pytest.raises(ValidationError, match="only SQLite"):
        Settings(database_url="postgresql://localhost/classify")


def test_the_queue_must_hold_the_largest_request():
    with pytest.raises(ValidationError, match="MAX_QUEUE must be at least MAX_IMAGES_PER_REQUEST"):
        Settings(max_queue=4, max_images_per_request=16)
    assert Settings(max_queue=4, max_images_per_request=4).max_queue == 4


def test_onnxruntime_is_the_default_backend_when_installed():
    assert Settings().inference_backend == "onnxruntime"
    assert Settings(inference_backend="torch").inference_backend == "torch"
