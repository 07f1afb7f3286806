"""Shared fixtures: tiny backbones built from configs (no hub) and the real SmolLM2 weights."""
import copy
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def _smollm2_pristine():
    from unified_tte.model.zoo import smollm2_135m
    return smollm2_135m()  # ~20 s on 2 cores: dequantises the GGUF once per session


@pytest.fixture
def smollm2(_smollm2_pristine):
    """A private copy of the real SmolLM2-135M-Instruct backbone (wrapping it mutates it)."""
    return copy.deepcopy(_smollm2_pristine)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine a second thread makes
    every op wait for a descheduled peer (10x slower); restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip themselves where CUDA is not available (CI runs every other tier)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
