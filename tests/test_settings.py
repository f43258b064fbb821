"""Settings refuse what the server cannot honour."""

import pytest
from pydantic import ValidationError

from settings import Settings


def test_only_sqlite_urls_are_accepted_until_the_limiter_can_lock_elsewhere():
    assert Settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"
    with pytest.raises(ValidationError, match="only SQLite"):
        Settings(database_url="postgresql://localhost/classify")


def test_model_threads_share_the_cores_by_default():
    settings = Settings(model_workers=1)
    assert settings.threads_per_worker >= 1
    assert Settings(model_workers=1, torch_threads=3).threads_per_worker == 3
