import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The SeaweedFS server of the S3 tests: started once per session, by the first test that asks.
from s3server import s3_bucket, seaweedfs  # noqa: E402,F401

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def host_cache_in_tmp_path(tmp_path, monkeypatch):
    """The caches of shared repositories (repository/location.py) under the test's directory,
    never in the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("REPO_ENGINE_CACHE_DIR", raising=False)
