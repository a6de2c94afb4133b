from __future__ import annotations

import time

import click

from griffin_export.settings import GGUF_QUANT, GGUF_QUANTS

from .options import human_bytes, k_summary, recorded_model_options, set_summary, status


@click.command("checkpoint")
@click.argument("bundle", metavar="BUNDLE|ROUTER")
@click.option("-o", "--output", required=True, metavar="DIR|FILE",
              help="model directory to write (--gguf: a .gguf file; a ROUTER: the folder of every class)")
@recorded_model_options
@click.option("--gguf", "as_gguf", is_flag=True, help="write one GGUF file for llama.cpp instead (base model: a GGUF)")
@click.option("--quant", type=click.Choice(GGUF_QUANTS), default=None,
              help=f"--gguf: llama.cpp file type, by llama.cpp's own quantizer [default: {GGUF_QUANT}]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="--gguf: quantizer threads [default: all]")
@click.option("--force", is_flag=True, help="replace an existing model directory")
@click.option("-q", "--quiet", is_flag=True, help="only the summary line")
def command(bundle, output, model, gguf_file, device, as_gguf, quant, threads, force, quiet):
    """Write BUNDLE (per-prompt or class) as a standalone Hugging Face model directory,
    or every class of a ROUTER (from `griffin-export discover`) into one folder.

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
      griffin-export checkpoint expert.safetensors --gguf -o pruned.gguf --quant Q4_1
      griffin-export checkpoint classes/router.safetensors -o deploy/          # deploy/{class}/ each
      griffin-export checkpoint classes/router.safetensors --gguf -o deploy/   # deploy/{class}.gguf each

    With --gguf the output is one GGUF file that llama.cpp runs (per-layer widths
    included): the base GGUF's tensors, tokenizer and chat template, the bundle's FF weights,
    quantized by llama.cpp's own quantizer (llama-cpp-python, the [llama] extra; F32 needs
    none).

    Given a ROUTER, the output folder holds each class's checkpoint under the class's name,
    with the router and its class bundles copied beside them, so `generate --router` and
    `serve --router` run from the folder as it is.
    """
    from griffin_export.bundle.format import read_info
    from griffin_export.classes.router import is_router
    from griffin_export.errors import GriffinError
    from griffin_export.targets.checkpoint import write_checkpoint
    from griffin_export.targets.class_set import export_class_set

    t0 = time.perf_counter()
    if not as_gguf and (quant or threads):
        raise GriffinError("--quant and --threads go with --gguf")
    if is_router(bundle):
        target = "gguf" if as_gguf else "hf"
        options = ({"quant": quant or GGUF_QUANT, "threads": threads, "progress": not quiet} if as_gguf
                   else {"device": device, "quiet": quiet})
        path = export_class_set(bundle, output, target, force=force, report=lambda line: status(line, quiet),
                                model=model, gguf_file=gguf_file, **options)
        click.echo(set_summary(path, target, time.perf_counter() - t0))
        return
    info = read_info(bundle)
    if as_gguf:
        from griffin_export.targets.gguf_export import export_gguf

        quant = quant or GGUF_QUANT
        path = export_gguf(bundle, output, model=model, gguf_file=gguf_file, quant=quant, threads=threads, force=force,
                           progress=not quiet, report=lambda line: status(line, quiet))
        click.echo(f"wrote {path}: {info.architecture} GGUF, {quant}, FF width {k_summary(info.k, info.d_ff)} × "
                   f"{info.num_layers} layers, {human_bytes(path.stat().st_size)}, {time.perf_counter() - t0:.1f} s")
        return
    status(f"loading base model {model or info.base_model} ...", quiet)
    path = write_checkpoint(bundle, output, model=model, gguf_file=gguf_file, device=device, force=force,
                            quiet=quiet)
    click.echo(f"wrote {path}/: {info.architecture}, {info.num_layers} layers, FF width {info.k[0]} of {info.d_ff} "
               f"({info.kind} bundle), {time.perf_counter() - t0:.1f} s")
