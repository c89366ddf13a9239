"""The repository's test setup (offline, private cache root, seeded RNGs) for the demo's tests too."""
from tests.conftest import _private_cache_root, _seed_everything, repo_root  # noqa: F401
