import os
import pathlib

# The suite compiles hundreds of small programs and times none of them, so compilation is most of its time:
# XLA's backend optimisation level 0 cuts it by about 30 % (measured on the quick tour: 90 s -> 64 s). Set
# before jax is imported; subprocesses started by the tests inherit it (tests/helpers.py's subprocess_env).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS"), FAST_COMPILE) if f)

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import REAL_DATA  # noqa: E402

# The tests compare float32 paths with oracles to ~1e-5. On a GPU, XLA's and cuDNN's default float32 products
# round their inputs to TF32 (~1e-3), so there the whole suite runs at strict float32.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run the suite on up to 4 worker processes when pytest-xdist is installed and no -n was given.

    In addopts `-n` would be an error without xdist; set here it is only a default. More than 4 workers would
    each start XLA's thread pools on the same cores. Registered after xdist, this runs before xdist's own
    tryfirst hook, which turns the option into workers; xdist's workers (`workerinput`) must not spawn more.
    """
    if (config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput")
            and config.getoption("numprocesses") is None and not config.getoption("usepdb")):
        config.option.numprocesses = "auto"
        if config.getoption("maxprocesses") is None:
            config.option.maxprocesses = 4


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real data: JAXSEQ_SHARED_DATA, else ../shared/data beside the checkout (as .ci/run sets it)."""
    root = os.environ.get("JAXSEQ_SHARED_DATA") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    if not pathlib.Path(root).is_dir():
        pytest.skip(REAL_DATA)
    return pathlib.Path(root)
