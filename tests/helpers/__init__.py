"""Helpers shared by the tests (importable as `helpers.<module>`: pytest puts tests/ on sys.path for the
root conftest). Nothing here is library code; tools may import `helpers.feature_cache` with tests/ on the path."""
