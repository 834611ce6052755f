import os
import tempfile

import pytest


@pytest.fixture
def scratch():
    """A directory on a disk-backed filesystem (O_DIRECT works there):
    $ZINF_TEST_DIR, else /var/tmp."""
    base = os.environ.get("ZINF_TEST_DIR", "/var/tmp")
    with tempfile.TemporaryDirectory(prefix="zinf-pytest.", dir=base) as path:
        yield path
