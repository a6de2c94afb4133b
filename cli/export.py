from __future__ import annotations

import time

import click

from .options import (EXPORT, chunk_option, density_option, dtype_option, human_bytes, k_summary, model_options,
                      offload_from, offload_options, precheck, status)

from griffin_export.choices import METHOD_SUMMARIES, METHODS

# The default: the best setting measured on the default model whose export cost scales to large
# models (README, "Which method"): topk with 8 full-width warm-up tokens.
DEFAULT_WARMUP = 8

_METHODS_HELP = "\b\nSelection methods (--method):\n" + "\n".join(
    f"  {name:<17} {summary}" for name, summary in METHOD_SUMMARIES.items())


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
@click.option("--warmup", default=DEFAULT_WARMUP, show_default=True, metavar="N",
              help="decode the first N tokens with the full model here: they join the statistic, the bundle stores "
                   "them and their KV, and generation from this prompt starts with them (greedy); 0 = the paper's "
                   "method exactly")
@click.option("--seed", default=EXPORT["seed"], show_default=True, help="seed for sample / topk_sample / random")
@click.option("--chat", is_flag=True, help="wrap the prompt in the model's chat template")
@click.option("--no-kv", is_flag=True, help="leave the prompt's KV cache out of the bundle")
@chunk_option
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def command(prompt, output, model, gguf_file, device, device_map, max_memory, offload_folder, dtype, density, method,
            refit_lambda, warmup, seed, chat, no_kv, chunk_size, force, quiet):
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
    from griffin_export.bundle.format import write_bundle
    from griffin_export.files.outputs import check_output_path
    from griffin_export.method.export import export_prompt
    from griffin_export.settings import ExportSettings
    from griffin_export.files.inputs import read_prompt
    from griffin_export.model.load import load_model

    t0 = time.perf_counter()
    settings = ExportSettings(density=density, method=method, seed=seed, chunk_size=chunk_size,
                              keep_kv=not no_kv, chat=chat, refit_lambda=refit_lambda, warmup=warmup)
    offload = offload_from(device_map, max_memory, offload_folder)
    check_output_path(output, force)  # fail before loading anything
    text = read_prompt(prompt)
    precheck(model, gguf_file, device, [density])
    status(f"loading model {model or 'default (SmolLM2-135M-Instruct)'} ...", quiet)
    lm = load_model(model, gguf_file=gguf_file, dtype=dtype, device=device, quiet=quiet, offload=offload)
    bundle = export_prompt(lm, text, settings, progress=not quiet)
    path = write_bundle(bundle, output, force=force)
    info = bundle.info
    click.echo(
        f"wrote {path}: {info.prompt_tokens} prompt tokens"
        + (f" + {info.warmup_tokens} warm-up tokens" if warmup else "")
        + f", {k_summary(info.k, info.d_ff)} × "
        f"{info.num_layers} layers ({info.method}, density {info.density}), "
        f"{'KV included' if info.has_kv else 'no KV'}, {human_bytes(path.stat().st_size)}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
