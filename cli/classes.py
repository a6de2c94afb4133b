from __future__ import annotations

import time
from pathlib import Path

import click

from .options import density_option, dtype_option, human_bytes, model_options, status, precheck

AGGREGATIONS = ["mean", "topk_freq", "pooled"]  # griffin_export.classes.AGGREGATIONS (kept import-free for --help)
METHODS = ["topk", "sample", "topk_sample"]


@click.command("class")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--name", required=True, help="the class's name, recorded in the bundle (e.g. news)")
@click.option("-o", "--output", required=True, metavar="FILE", help="class bundle to write (.safetensors)")
@click.option("--field", default="prompt", show_default=True, help="JSONL key holding the prompt text")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="use only the first N prompts")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="pooled", show_default=True,
              help="how per-prompt scores become one class score: pooled = the statistic over all the class's "
                   "tokens at once; mean = mean of each prompt's scores normalized per layer; topk_freq = how "
                   "often a neuron is in a prompt's top-k")
@model_options
@dtype_option
@density_option
@click.option("--method", type=click.Choice(METHODS), default="topk", show_default=True,
              help="neuron selection on the class score")
@click.option("--seed", default=0, show_default=True, help="seed for sample / topk_sample")
@click.option("--chat", is_flag=True, help="wrap each prompt in the model's chat template")
@click.option("--chunk-size", default=512, show_default=True, help="prefill chunk length (tokens)")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary line")
def command(inputs, name, output, field, limit, aggregation, model, gguf_file, device, dtype, density, method, seed,
            chat, chunk_size, force, quiet):
    """Experts for a class of prompts: one full prefill per prompt, one bundle for all.

    INPUT is a JSONL file (one prompt per line, in --field), a folder of .txt files (one
    prompt per file) or a text file; give several to combine them. Prompts are streamed:
    memory does not grow with their number. Prompts longer than the model's context are
    skipped and counted, never truncated. The bundle has no KV cache: it is for new prompts
    (griffin-export generate CLASS.safetensors --prompt-file NEW.txt).

    \b
    Examples:
      griffin-export class prompts.jsonl --name news -o news.safetensors
      griffin-export class ../shared/data/xsum_dev.jsonl --field article --limit 200 --name news -o news.safetensors
      griffin-export class prompts/ --name code -o code.safetensors --density 0.75
      griffin-export class a.jsonl b.jsonl extra.txt --name mixed -o mixed.safetensors --aggregation topk_freq
    """
    from griffin_export.bundle import check_output_path, write_bundle
    from griffin_export.classes import ClassSettings, count_prompts, export_class, iter_prompts
    from griffin_export.models import load_model

    t0 = time.perf_counter()
    settings = ClassSettings(name=name, aggregation=aggregation, density=density, method=method, seed=seed,
                             chunk_size=chunk_size, chat=chat)
    check_output_path(output, force)  # fail before loading anything
    total = count_prompts(inputs, field, limit)  # reads every input once: bad lines fail here, not after an hour
    precheck(model, gguf_file, device, [density])
    status(f"{total} prompts; loading model {model or 'default (SmolLM2-135M-Instruct)'} ...", quiet)
    lm = load_model(model, gguf_file=gguf_file, dtype=dtype, device=device, quiet=quiet)
    result = export_class(lm, iter_prompts(inputs, field, limit), settings, total=total, progress=not quiet,
                          source=", ".join(Path(i).name for i in inputs))
    if result.skipped:
        click.echo(f"griffin-export: warning: skipped {result.skipped} of {total} prompts longer than the model's "
                   f"context (first: {result.first_skipped})", err=True)
    path = write_bundle(result.bundle, output, force=force)
    info = result.bundle.info
    click.echo(
        f"wrote {path}: class {name!r} from {result.statistic.prompts} prompts ({result.statistic.tokens} tokens, "
        f"{result.skipped} skipped), {aggregation}, k={info.k[0]}/{info.d_ff} per layer × {info.num_layers} layers "
        f"({info.method}, density {info.density}), {human_bytes(path.stat().st_size)}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
