from __future__ import annotations

import time

import click

from griffin_export.registry import AGGREGATIONS, CLASS_METHODS
from griffin_export.settings import (
    CLUSTERINGS,
    K_CRITERIA,
    ClassSettings,
    CountSettings,
    DiscoverSettings,
    defaults,
    plural,
)

from .options import (
    chunk_option,
    density_option,
    dtype_option,
    human_bytes,
    model_options,
    ray_options,
    require_extra,
    status,
    threads_option,
)

CLASS = defaults(ClassSettings)
FOUND = defaults(DiscoverSettings)


@click.command("discover")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--output", default=None, metavar="DIR",
              help="folder to write: a bundle per class, router.safetensors, report.md and report.json [required, "
                   "except with --shard]")
@click.option("--name", default="class", show_default=True, help="the classes are named NAME-1, NAME-2, ... by size")
@click.option("-k", "--classes", "k", type=click.IntRange(min=1), default=None,
              help="how many classes [default: chosen by --k-criterion among 1..--k-max]")
@click.option("--k-max", default=FOUND["k_max"], show_default=True, type=click.IntRange(min=2),
              help="the most classes to consider when choosing k")
@click.option("--k-criterion", type=click.Choice(K_CRITERIA), default=FOUND["k_criterion"], show_default=True,
              help="how k is chosen: coverage, the fewest classes past which one more keeps under 0.3 % more of each "
                   "prompt's own experts; silhouette, the cosine silhouette's best of 2..--k-max (on the mixed dev "
                   "log it lumped four kinds into one class)")
@click.option("--clustering", type=click.Choice(CLUSTERINGS), default=FOUND["clustering"], show_default=True,
              help="kmeans: k-means on the unit-norm statistics; agglomerative: average linkage by cosine distance")
@click.option("--router-layers", default=FOUND["router_layers"], show_default=True, type=click.IntRange(min=1),
              help="the router reads the FF statistic of this many first layers (a fraction of a prefill)")
@click.option("--guard-quantile", default=FOUND["guard_quantile"], show_default=True, type=click.FloatRange(0, 1),
              help="a new prompt less like its class than this fraction of the class's own prompts falls back "
                   "to the full model (0: never)")
@click.option("--save-statistics", default=None, metavar="FILE",
              help="also keep every prompt's statistic in FILE: discover again from it (--statistics) with another "
                   "-k or --clustering, without a prefill")
@click.option("--statistics", multiple=True, metavar="FILE",
              help="read the prompts' statistics from a --save-statistics FILE of these INPUTs instead of prefilling; "
                   "repeat it for every shard's file of one --shard split")
@click.option("--shard", default=None, metavar="I/N",
              help="count only the I-th of N slices of the prompts into --save-statistics FILE (no clustering): "
                   "N machines split a long log, then `discover --statistics` every shard's file clusters them all")
@ray_options("prefill the prompts")
@click.option("--field", default="prompt", show_default=True, help="JSONL key holding the prompt text")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="use only the first N prompts")
@click.option("--aggregation", type=click.Choice(list(AGGREGATIONS)), default=CLASS["aggregation"], show_default=True,
              help="how a class's prompts' scores become its score (as `class --aggregation`)")
@model_options
@dtype_option
@density_option
@click.option("--method", type=click.Choice(CLASS_METHODS), default=CLASS["method"], show_default=True,
              help="neuron selection on each class's score (the topk_refit* methods count each class's prompts "
                   "once more, for the Gram)")
@click.option("--seed", default=FOUND["seed"], show_default=True, help="seed of the clustering and the selection")
@click.option("--chat", is_flag=True, help="wrap each prompt in the model's chat template")
@chunk_option
@threads_option
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary")
def command(inputs, output, name, k, k_max, k_criterion, clustering, router_layers, guard_quantile, save_statistics,
            statistics, shard, engine, address, workers, gpus_per_worker, field, limit, aggregation, model,
            gguf_file, device, dtype, density, method, seed, chat, chunk_size, threads, force, quiet):
    """Find the classes of an unlabeled log of prompts, and write a class bundle for each and the
    router that sends a new prompt to its class.

    INPUT is what `class` reads: JSONL files (one prompt per line, in --field), folders of .txt
    files, text files. Each prompt gets one full prefill; the prompts are clustered by their FF
    statistics (which neurons their experts would keep); each cluster becomes a class bundle; the
    router, beside them, routes a new prompt from its first --router-layers layers, and a guard sends
    a prompt that fits no class to the full model.

    \b
    Examples:
      griffin-export discover bench/data/mixed_dev.jsonl -o classes/
      griffin-export discover traffic.jsonl -k 4 --method topk_refit -o classes/ --name traffic
      griffin-export generate --router classes/router.safetensors --prompts queue.jsonl -o answers.jsonl
      griffin-export inspect classes/router.safetensors
      # a long log on two machines: each counts a half, then one clusters both halves
      griffin-export discover traffic.jsonl --shard 1/2 --save-statistics part1.safetensors
      griffin-export discover traffic.jsonl --shard 2/2 --save-statistics part2.safetensors
      griffin-export discover traffic.jsonl --statistics part1.safetensors --statistics part2.safetensors -o classes/
      griffin-export discover traffic.jsonl --engine ray --workers 8 -o classes/      # prefills on a Ray cluster
    """
    require_extra("classes")
    from griffin_export.classes.discover import check_discovery_dir, discover, discover_shard, write_discovery
    from griffin_export.files.outputs import check_output_path
    from griffin_export.model.load import ModelSource, use_threads

    t0 = time.perf_counter()
    settings = ClassSettings(name=name, aggregation=aggregation, density=density, method=method, seed=seed,
                             chunk_size=chunk_size, chat=chat)
    count = CountSettings(engine=engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    if engine == "ray" and (shard is not None or statistics):
        raise click.UsageError("--engine ray prefills the INPUTs; --shard and --statistics are without it")
    if shard is not None:
        if save_statistics is None or output is not None or statistics:
            raise click.UsageError("--shard counts one slice of the prompts into --save-statistics FILE; "
                                   "give it without -o and --statistics")
        use_threads(threads)
        log = discover_shard(inputs, settings, shard, save_statistics, ModelSource(model, gguf_file, dtype, device),
                             field=field, limit=limit, progress=not quiet, force=force)
        click.echo(f"wrote {save_statistics}: shard {shard}, {plural(len(log.prompts), 'prompt')}"
                   + (f" ({len(log.skipped)} over the context, skipped)" if log.skipped else "")
                   + f", {time.perf_counter() - t0:.1f} s")
        return
    if output is None:
        raise click.UsageError("Missing option '-o' / '--output'.")
    found = DiscoverSettings(k=k, k_max=k_max, k_criterion=k_criterion, clustering=clustering, router_layers=router_layers,
                             guard_quantile=guard_quantile, seed=seed)
    check_discovery_dir(output, force)  # fail before loading anything
    if save_statistics:
        check_output_path(save_statistics, force)
    use_threads(threads)
    result = discover(inputs, settings, found, ModelSource(model, gguf_file, dtype, device), field=field, limit=limit,
                      progress=not quiet, report=lambda line: status(line, quiet), statistics=list(statistics) or None,
                      save_statistics=save_statistics, engine=count)
    out = write_discovery(result, output, force=force)
    size = sum(f.stat().st_size for f in out.iterdir())
    r = result.report
    click.echo(f"wrote {out}/: {plural(r['k'], 'class', 'classes')} from {plural(r['prompts'], 'prompt')} ("
               + ", ".join(f"{c['name']} {c['prompts']}" for c in r["classes"])
               + f"), router over {r['router_layers']} layers, {human_bytes(size)}, {time.perf_counter() - t0:.1f} s")
