import os
import tempfile

# Prefect's telemetry needs network; tests run offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Local copies of object-store tables (storage/mirror.py) go to a folder of the test run, not ~/.cache.
os.environ.setdefault("FACETS_CACHE_DIR", tempfile.mkdtemp(prefix="facets-test-cache-"))
