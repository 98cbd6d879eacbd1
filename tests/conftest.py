"""Test configuration: 8 host CPU devices for the data-parallel tests, strict rank promotion."""

import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = pathlib.Path(__file__).resolve().parent.parent
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


@pytest.fixture
def multi30k_dir():
    if not MULTI30K.is_dir():
        pytest.skip(f"the Multi30k corpus is not at {MULTI30K}")
    return MULTI30K
