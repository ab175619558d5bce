import os
import pathlib

import jax
import pytest


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real data beside the checkout (../shared/data), found through JAXSEQ_SHARED_DATA."""
    root = os.environ.get("JAXSEQ_SHARED_DATA")
    if not root or not pathlib.Path(root).is_dir():
        pytest.skip("real data not available: set JAXSEQ_SHARED_DATA to the shared/data folder (.ci/run does)")
    return pathlib.Path(root)
