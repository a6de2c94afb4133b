from __future__ import annotations

import time

import click

from griffin_export.choices import GGUF_QUANT, GGUF_QUANTS

from .options import human_bytes, k_summary, recorded_model_options, status


@click.command("checkpoint")
@click.argument("bundle", metavar="BUNDLE")
@click.option("-o", "--output", required=True, metavar="DIR|FILE", help="model directory to write (--gguf: a .gguf file)")
@recorded_model_options
@click.option("--gguf", "as_gguf", is_flag=True, help="write one GGUF file for llama.cpp instead (base model: a GGUF)")
@click.option("--quant", type=click.Choice(GGUF_QUANTS), default=None,
              help=f"--gguf: llama.cpp file type, by llama.cpp's own quantizer [default: {GGUF_QUANT}]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="--gguf: quantizer threads [default: all]")
@click.option("--force", is_flag=True, help="replace an existing model directory")
@click.option("-q", "--quiet", is_flag=True, help="only the summary line")
def command(bundle, output, model, gguf_file, device, as_gguf, quant, threads, force, quiet):
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
      griffin-export checkpoint expert.safetensors --gguf -o pruned.gguf --quant Q4_1

    With --gguf the output is one GGUF file that llama.cpp runs (per-layer widths
    included): the base GGUF's tensors, tokenizer and chat template, the bundle's FF weights,
    quantized by llama.cpp's own quantizer (llama-cpp-python, the [llama] extra; F32 needs
    none).
    """
    from griffin_export.bundle.format import read_info
    from griffin_export.targets.checkpoint import write_checkpoint
    from griffin_export.errors import GriffinError

    t0 = time.perf_counter()
    if not as_gguf and (quant or threads):
        raise GriffinError("--quant and --threads go with --gguf")
    info = read_info(bundle)
    if as_gguf:
        return _gguf(bundle, info, output, model, gguf_file, quant or GGUF_QUANT, threads, force, quiet, t0)
    status(f"loading base model {model or info.base_model} ...", quiet)
    path = write_checkpoint(bundle, output, model=model, gguf_file=gguf_file, device=device, force=force,
                            quiet=quiet)
    click.echo(f"wrote {path}/: {info.architecture}, {info.num_layers} layers, FF width {info.k[0]} of {info.d_ff} "
               f"({info.kind} bundle), {time.perf_counter() - t0:.1f} s")


def _gguf(bundle, info, output, model, gguf_file, quant, threads, force, quiet, t0) -> None:
    from griffin_export.bundle.format import read_bundle
    from griffin_export.bundle.experts import check_bundle
    from griffin_export.targets.gguf_export import base_gguf, check_architecture, write_pruned_gguf
    from griffin_export.settings import require_llama_cpp
    from griffin_export.model.load import load_model
    from griffin_export.files.outputs import check_output_path

    check_architecture(info.architecture)
    check_output_path(output, force)  # before loading the model (write_pruned_gguf checks again, cheaply)
    if quant != "F32":
        require_llama_cpp()
    base = base_gguf(model, gguf_file, info)
    status(f"checking {base.name} against the bundle ...", quiet)
    lm = load_model(str(base), dtype=info.dtype, quiet=quiet)
    check_bundle(lm, info, bundle)  # the same base model, by fingerprint
    del lm
    b = read_bundle(bundle, load_kv=False)
    path = write_pruned_gguf(b, base, output, quant, force=force, threads=threads, source=str(bundle), progress=not quiet)
    click.echo(f"wrote {path}: {info.architecture} GGUF, {quant}, FF width {k_summary(info.k, info.d_ff)} × "
               f"{info.num_layers} layers, {human_bytes(path.stat().st_size)}, {time.perf_counter() - t0:.1f} s")
