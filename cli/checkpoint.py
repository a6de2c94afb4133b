from __future__ import annotations

import time

import click

from .options import recorded_model_options, status


@click.command("checkpoint")
@click.argument("bundle", metavar="BUNDLE")
@click.option("-o", "--output", required=True, metavar="DIR", help="model directory to write")
@recorded_model_options
@click.option("--force", is_flag=True, help="replace an existing model directory")
@click.option("-q", "--quiet", is_flag=True, help="only the summary line")
def command(bundle, output, model, gguf_file, device, force, quiet):
    """Write BUNDLE (per-prompt or class) as a standalone Hugging Face model directory.

    The directory holds a config with the pruned FF width, the weights (safetensors) and
    the tokenizer, and loads with plain transformers, no griffin code:
    AutoModelForCausalLM.from_pretrained(DIR). Every token, the prompt's too, runs through
    the experts (as `generate --pruned-prefill`). config.json records the base model, its
    fingerprint and the bundle's metadata under "griffin".

    \b
    Examples:
      griffin-export checkpoint news.safetensors -o news-model/
      griffin-export checkpoint expert.safetensors -o expert-model/ --force
      python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('news-model')"
    """
    from griffin_export.bundle import read_info
    from griffin_export.checkpoint import write_checkpoint

    t0 = time.perf_counter()
    info = read_info(bundle)
    status(f"loading base model {model or info.base_model} ...", quiet)
    path = write_checkpoint(bundle, output, model=model, gguf_file=gguf_file, device=device, force=force,
                            quiet=quiet)
    click.echo(f"wrote {path}/: {info.architecture}, {info.num_layers} layers, FF width {info.k[0]} of {info.d_ff} "
               f"({info.kind} bundle), {time.perf_counter() - t0:.1f} s")
