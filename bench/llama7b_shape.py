"""Decode speed on a Llama-2-7B-shaped model with random weights (speed does not depend on
the weights' values), full vs pruned, PyTorch and ONNX Runtime side by side in one process.

    python bench/llama7b_shape.py --density 0.5 -o reports/gpu_llama7b     # a GPU: fp16, CUDA provider
    python bench/llama7b_shape.py --tiny --device cpu --dtype float32      # a small smoke run on a CPU

The shape is Llama-2-7B's (32 layers, hidden 4096, FF 11008, 32 heads, vocab 32000); the
prompt is --prompt-tokens random token ids (seeded), standing in for a ~1k-token article.
Everything else is `griffin-export bench` (griffin_export/bench.py): the same export, the
same runtimes and the same interleaved timing.
"""

from __future__ import annotations

import argparse

import torch

from griffin_export.model.arch import spec_for
from griffin_export.evaluation.speed import format_table, run_bench, write_results
from griffin_export.settings import PROVIDERS
from griffin_export.model.load import LoadedModel
from griffin_export.settings import BenchSettings

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5)


def random_model(shape: dict, layers: int | None, dtype: torch.dtype, device: str, seed: int) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    name = "Llama-2-7B-shaped" if shape is LLAMA2_7B else "tiny Llama-shaped"
    identity = f"random {name} ({config.num_hidden_layers} layers, seed {seed})"
    # the weights are random: an identity string stands in for hashing 13 GB of them
    return LoadedModel(model, None, identity, spec_for("llama"), _fingerprint=f"random-llama-seed{seed}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", default="0.5", help="comma-separated densities [0.5]")
    p.add_argument("--runtime", default="torch,onnx", help="comma-separated: torch, torch-lean, onnx, onnx-lean [torch,onnx]")
    p.add_argument("--onnx-provider", default="auto", choices=PROVIDERS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (a smaller model)")
    p.add_argument("--tiny", action="store_true", help="a small Llama shape instead of 7B's (smoke test)")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="also write DIR/bench.json and DIR/bench.md")
    a = p.parse_args()

    lm = random_model(TINY if a.tiny else LLAMA2_7B, a.layers, getattr(torch, a.dtype), a.device, a.seed)
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, lm.config.vocab_size, (1, a.prompt_tokens), generator=g)
    settings = BenchSettings(densities=[float(d) for d in a.density.split(",")], new_tokens=a.new_tokens,
                             repeats=a.repeats, runtimes=a.runtime.split(","), onnx_provider=a.onnx_provider,
                             time_export=False)
    result = run_bench(settings=settings, lm=lm, ids=ids, prompt_source=f"{a.prompt_tokens} random token ids")
    print(format_table(result), flush=True)
    if a.output:
        write_results(result, a.output, force=True)


if __name__ == "__main__":
    main()
