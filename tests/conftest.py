"""Shared fixtures: tiny backbones built from configs (no hub) and the real SmolLM2 weights."""
import copy
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def _smollm2_pristine():
    from unified_tte.backbones import smollm2_135m
    return smollm2_135m()  # ~20 s on 2 cores: dequantises the GGUF once per session


@pytest.fixture
def smollm2(_smollm2_pristine):
    """A private copy of the real SmolLM2-135M-Instruct backbone (wrapping it mutates it)."""
    return copy.deepcopy(_smollm2_pristine)
