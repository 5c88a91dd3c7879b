import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The SeaweedFS server of the S3 tests: started once per session, by the first test that asks.
from s3server import s3_bucket, seaweedfs  # noqa: E402,F401
