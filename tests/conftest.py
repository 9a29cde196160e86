"""Under CI (CI=true) the property tests draw the same examples on every run: a clean checkout
has no example database, and a random draw that fails once would make CI flaky instead of
failing the change that caused it. Locally they keep exploring."""

import os

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a test extra; its tests skip without it
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("CI", "").lower() == "true":
        settings.load_profile("ci")
