"""What the tests share: tiny randomly initialized models of every supported architecture (no
downloads), their tokenizer and prompts, the command line run in-process, and the small checks
many tests make. Imported as `tests.helpers` (pytest puts the repository root on the path)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig,
                          OPTConfig, Phi3Config, Qwen2Config, Qwen3Config)

from griffin_export import from_model
from griffin_export.errors import GriffinError
from griffin_export.model.arch import ff_blocks
from griffin_export_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "xsum_dev.jsonl"  # the XSum prompts shipped with the repository

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=8),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=16),
    # a sliding layer then a global one, as Gemma 3 interleaves them (window 16 < the 24-token prompts)
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=16,
                                            layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32),
}
ARCHS = sorted(CONFIGS)

# The lean ONNX graph's GroupQueryAttention wants head_dim a multiple of 16 on the CPU (its
# rotary kernel), so its tests use these: the Llama family, head_dim 16, and Mistral with a
# sliding window shorter than the test prompts.
LEAN = dict(COMMON, hidden_size=64, num_hidden_layers=4)  # 4 layers: topk_refit_edges gives uneven k
LEAN_CONFIGS = {
    "llama": lambda: LlamaConfig(**LEAN),
    "mistral": lambda: MistralConfig(**LEAN, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**LEAN),
    "qwen3": lambda: Qwen3Config(**LEAN, head_dim=16),
}
LEAN_ARCHS = sorted(LEAN_CONFIGS)


def tiny_model(arch: str, seed: int = 0, *, lean: bool = False):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config((LEAN_CONFIGS if lean else CONFIGS)[arch](), dtype=torch.float32)
    # Random init leaves OPT/Gemma activations tiny; scale up so selections are not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return from_model(model.eval(), identity=f"tiny-{arch}")


def prompt_ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


@contextmanager
def masked(model, indices):
    """The full model with every FF neuron outside `indices` (per layer) zeroed: the
    mathematical definition of running with only those neurons."""
    blocks = ff_blocks(model, from_model(model).spec)
    handles = []
    for block, idx in zip(blocks, indices):
        mask = torch.zeros(block.output.weight.shape[1])
        mask[idx] = 1.0
        handles.append(block.output.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decode_tokens(steps: int = 20, seed: int = 5) -> list[int]:
    """`steps` random token ids of the tiny vocabulary (no special tokens): a continuation to teacher-force."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (steps,), generator=g).tolist()


def steps(rt, start, tokens) -> torch.Tensor:
    """First logits + teacher-forced decode: [len(tokens), vocab]. Every runtime has start/step."""
    state, first = start
    return torch.stack([first, *(rt.step(state, t) for t in tokens[:-1])])

def greedy(model, ids: torch.Tensor, n: int, eos: int | None = None) -> list[int]:
    """n greedy tokens of `model` as it is (no runtime involved), stopping before `eos`."""
    from griffin_export.model.prefill import forward, prefill

    cache, logits = prefill(model, ids)
    out: list[int] = []
    for _ in range(n):
        tok = int(torch.argmax(logits))
        if tok == eos:
            break
        out.append(tok)
        logits = forward(model, torch.tensor([[tok]]), cache)[-1]
    return out


def tiny_prompt(n: int = 20) -> str:
    return " ".join(f"w{(7 * i) % (VOCAB - 3)}" for i in range(n))


def tiny_tokenizer():
    """A word-level tokenizer of the tiny vocabulary: w0 .. w92 and <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Two per-layer index lists are equal, layer by layer."""
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def refused(fn, *parts: str) -> str:
    """fn() raises a one-line GriffinError holding every part; returns its message."""
    with pytest.raises(GriffinError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


def one_line(argv, capsys, *parts: str) -> str:
    """`griffin-export ARGV` fails as a bad input must: exit 2, one line naming every part, no traceback."""
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("griffin-export: error: ") and "Traceback" not in err, err
    assert all(p in err for p in parts), err
    return err


def run(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `griffin-export ARGV`; every argument is str()-ed."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def class_texts(n: int) -> list[str]:
    """n different prompts of different lengths (8, 11, 14, ... tokens)."""
    return [" ".join(f"w{(5 * i + 11 * j) % (VOCAB - 3)}" for j in range(8 + 3 * i)) for i in range(n)]


def write_jsonl(path, rows, field="prompt"):
    """A JSONL file of prompts, one `field` per line."""
    path.write_text("".join(json.dumps({field: r}) + "\n" for r in rows))
    return path


def rewrite(path, out, *, tensors=None, meta=None):
    """Copy a bundle with some tensors / metadata replaced."""
    from safetensors.torch import load_file, save_file

    from griffin_export.bundle.format import read_metadata

    t = load_file(str(path))
    m, _ = read_metadata(path)
    t.update(tensors or {})
    m.update(meta or {})
    save_file(t, str(out), metadata=m)
    return out
