from __future__ import annotations

import time

import click

from griffin_export.registry import METHODS
from griffin_export.settings import ExportSettings

from .options import (EXPORT, chunk_option, density_option, dtype_option, human_bytes, k_summary, model_options,
                      offload_from, offload_options, status, threads_option)

_METHODS_HELP = "\b\nSelection methods (--method):\n" + "\n".join(
    f"  {m.name:<17} {m.summary}" for m in METHODS.values())


@click.command("export", epilog=_METHODS_HELP)
@click.argument("prompt", metavar="PROMPT_FILE")
@click.option("-o", "--output", required=True, metavar="FILE", help="bundle to write (.safetensors)")
@model_options
@offload_options
@dtype_option
@density_option
@click.option("--method", type=click.Choice(METHODS), default=EXPORT["method"], show_default=True,
              help="neuron selection (each one is listed below)")
@click.option("--refit-lambda", default=EXPORT["refit_lambda"], show_default=True, help="ridge strength of the topk_refit methods")
@click.option("--warmup", default=EXPORT["warmup"], show_default=True, metavar="N",
              help="decode the first N tokens with the full model here: they join the statistic, the bundle stores "
                   "them and their KV, and generation from this prompt starts with them (greedy); 0 = the paper's "
                   "method exactly")
@click.option("--seed", default=EXPORT["seed"], show_default=True, help="seed for sample / topk_sample / random")
@click.option("--chat", is_flag=True, help="wrap the prompt in the model's chat template")
@click.option("--no-kv", is_flag=True, help="leave the prompt's KV cache out of the bundle")
@chunk_option
@threads_option
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def command(prompt, output, model, gguf_file, device, device_map, max_memory, offload_folder, dtype, density, method,
            refit_lambda, warmup, seed, chat, no_kv, chunk_size, threads, force, quiet):
    """Prefill PROMPT_FILE (UTF-8 text, or - for stdin) with the full model and write an expert bundle.

    \b
    Examples:
      griffin-export samples/prompt.txt -o expert.safetensors
      griffin-export samples/prompt.txt -o e25.safetensors --density 0.25 --method topk_sample
      griffin-export samples/prompt.txt -o warm.safetensors --method topk_refit --warmup 8
      echo "Tell me about owls." | griffin-export - -o owls.safetensors --chat
      griffin-export prompt.txt -o expert.safetensors --model ./my-llama-dir --dtype bfloat16
      griffin-export prompt.txt -o expert.safetensors --model ./big-model --device-map auto --max-memory cpu=8GiB
    """
    from griffin_export.method.export import export_file
    from griffin_export.model.load import ModelSource, use_threads

    t0 = time.perf_counter()
    settings = ExportSettings(density=density, method=method, seed=seed, chunk_size=chunk_size,
                              keep_kv=not no_kv, chat=chat, refit_lambda=refit_lambda, warmup=warmup)
    source = ModelSource(model, gguf_file, dtype, device, offload_from(device_map, max_memory, offload_folder))
    use_threads(threads)
    path, bundle = export_file(prompt, output, settings, source, force=force, progress=not quiet,
                               report=lambda line: status(line, quiet))
    info = bundle.info
    click.echo(
        f"wrote {path}: {info.prompt_tokens} prompt tokens"
        + (f" + {info.warmup_tokens} warm-up tokens" if warmup else "")
        + f", {k_summary(info.k, info.d_ff)} × "
        f"{info.num_layers} layers ({info.method}, density {info.density}), "
        f"{'KV included' if info.has_kv else 'no KV'}, {human_bytes(path.stat().st_size)}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
