from __future__ import annotations

import sys

import click

from .options import decode_options, recorded_model_options, require_extra, status

from griffin_export.settings import DecodeOptions


@click.command("generate")
@click.argument("bundles", metavar="BUNDLE", nargs=-1, required=True)
@recorded_model_options
@decode_options
@click.option("--prompt-file", default=None, metavar="FILE", help="a new prompt: full-model prefill, then decode with the bundle's experts")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE.jsonl",
              help="many new prompts (one per JSONL line, in --field), generated in batches; answers go to -o")
@click.option("--field", default="prompt", show_default=True, help="--prompts: the JSONL key holding the prompt")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="--prompts: sequences prefilled and decoded together")
@click.option("-o", "--output", default=None, metavar="FILE.jsonl",
              help="--prompts: answers, one JSON row per finished prompt (index, where, text, tokens, stop_reason)")
@click.option("--resume", is_flag=True, help="--prompts: keep the answers already in -o, generate the rest")
@click.option("--force", is_flag=True, help="--prompts: overwrite an existing -o")
@click.option("--pruned-prefill", is_flag=True,
              help="prefill the prompt through the experts too (as a standalone pruned checkpoint does): "
                   "no full FF weights in memory, lower quality")
@click.option("--runtime", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx: ONNX Runtime on a graph from `griffin-export onnx` (CUDA if a GPU answers, else CPU)")
@click.option("--onnx", "onnx_dir", default=None, metavar="DIR", help="--runtime onnx: the bundle's graph directory")
@click.option("--onnx-full", default=None, metavar="DIR",
              help="--runtime onnx: a graph from `griffin-export onnx --full`, for the prefill of --prompt-file")
@click.option("--eager", is_flag=True,
              help="--runtime torch: decode through transformers' forward instead of the lean step (runtime/lean.py)")
@click.option("--compile", "compile_", is_flag=True,
              help="--runtime torch: torch.compile the lean step (CUDA graphs on a GPU; on a CPU it measured no faster)")
@click.option("-q", "--quiet", is_flag=True, help="print only the generated text")
def command(bundles, model, gguf_file, device, max_new_tokens, temperature, top_p, stop, seed, prompt_file,
            prompts_file, field, batch_size, output, resume, force, pruned_prefill, runtime, onnx_dir, onnx_full, eager,
            compile_, quiet):
    """Decode from BUNDLE with its experts, resuming from the bundle's cached KV.

    The base model is the one recorded in the bundle unless --model says otherwise; it must
    be the exact model the bundle was exported from (checked by fingerprint). With --prompts,
    every prompt of a JSONL file is generated, --batch-size at a time, and each answer appended
    to -o as it finishes (--resume continues an interrupted run).

    \b
    Examples:
      griffin-export generate expert.safetensors --max-new-tokens 64
      griffin-export generate expert.safetensors --temperature 0.7 --top-p 0.9 --stop "###"
      griffin-export generate expert.safetensors --prompt-file new_article.txt
      griffin-export generate news.safetensors --prompt-file new_article.txt   # a class bundle
      griffin-export generate news.safetensors --prompt-file new_article.txt --pruned-prefill
      griffin-export generate expert.safetensors --runtime onnx --onnx expert_onnx/
      griffin-export generate expert.safetensors --runtime onnx --onnx expert_onnx/ --onnx-full full_onnx/ --prompt-file new.txt
      griffin-export generate news.safetensors --prompts queue.jsonl --batch-size 16 -o answers.jsonl
      griffin-export generate news.safetensors --prompts queue.jsonl -o answers.jsonl --resume   # after an interruption
    """
    if len(bundles) > 1:  # one run decodes with one bundle's experts: a batch shares its weights
        raise click.UsageError(f"generate takes one BUNDLE, got {len(bundles)}: a batch decodes with one bundle's "
                               "experts (mixing bundles would mix weights); run one generate per bundle")
    bundle = bundles[0]
    if prompts_file is not None:
        return _batched(bundle, model, gguf_file, device, max_new_tokens, temperature, top_p, stop, seed, prompt_file,
                        prompts_file, field, batch_size, output, resume, force, pruned_prefill, runtime, onnx_dir,
                        onnx_full, eager, compile_, quiet)
    if output or resume or force:
        raise click.UsageError("-o, --resume and --force are for --prompts")
    from griffin_export.bundle.format import read_bundle, read_info
    from griffin_export.errors import GriffinError
    from griffin_export.files.inputs import read_prompt
    from griffin_export.runtime.pytorch import load_runtime

    opts = DecodeOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         stop=tuple(stop), seed=seed)
    if runtime == "onnx":
        if eager or compile_:
            raise GriffinError("--eager and --compile choose the PyTorch decode step; the ONNX graph is chosen at export")
        if model is not None or device != "cpu" or gguf_file is not None:
            raise GriffinError("--model, --gguf-file and --device are for --runtime torch; the ONNX graph carries "
                               "its model and ONNX Runtime picks the provider")
        if onnx_dir is None:
            raise GriffinError("--runtime onnx needs --onnx DIR (a graph from `griffin-export onnx BUNDLE -o DIR`)")
    elif eager and compile_:
        raise GriffinError("--compile compiles the lean step; --eager turns it off: choose one")
    prompt = read_prompt(prompt_file) if prompt_file else None
    info = read_info(bundle)
    if info.kind == "class" and prompt is None:
        raise GriffinError(f"{bundle} is a class bundle ({info.extra.get('class', '?')}): it has no prompt of its "
                           "own; give one with --prompt-file")
    # the whole bundle is read and checked before anything loads, so a corrupt one costs no model load
    b = read_bundle(bundle, load_kv=not (prompt is not None or pruned_prefill))
    if runtime == "onnx":
        require_extra("onnx", ("onnxruntime",))
        from griffin_export.runtime.onnx import load_onnx_runtime

        rt = load_onnx_runtime(onnx_dir, b, full=onnx_full, new_prompts=prompt is not None,
                               pruned_prefill=pruned_prefill, source=str(bundle))
        if prompt is None:
            rt.check_room(info.prompt_tokens, opts.max_new_tokens)
        status(rt.describe(), quiet)
    else:
        if prompt is None:  # the context is in the model's config: refuse before the weights load
            from griffin_export.model.tokens import check_generation_fits
            from griffin_export.model.load import check_device, peek_architecture

            check_device(device)
            ctx = peek_architecture(model or info.base_model, gguf_file).context_length
            check_generation_fits(info.prompt_tokens, opts.max_new_tokens, ctx)
        status(f"loading base model {model or info.base_model} ...", quiet)
        rt = load_runtime(b, model, gguf_file=gguf_file, device=device, new_prompts=prompt is not None,
                          pruned_prefill=pruned_prefill, lean=False if eager else None, compile=compile_,
                          source=str(bundle))
        rt.prepare()  # the lean step's one-time packing, before the timed decode
    def show(piece: str) -> None:  # streamed, so an interrupted run keeps what it printed
        click.echo(piece, nl=False)
        sys.stdout.flush()

    out = rt.generate(opts, prompt=prompt, on_text=show if rt.tokenizer is not None else None)
    dt = out.decode_s  # the decoding loop alone: a new prompt's prefill is not decode speed
    click.echo("")
    # the bundle's warm-up tokens start the output but cost no decoding here
    warm = 0 if prompt is not None else min(info.warmup_tokens, len(out.token_ids))
    decoded = len(out.token_ids) - warm
    status(f"[{decoded} tokens in {dt:.2f} s, {decoded / max(dt, 1e-9):.1f} tok/s"
           + (f", after {warm} warm-up tokens from the bundle" if warm else "") + f", stop: {out.stop_reason}]", quiet)


def _batched(bundle, model, gguf_file, device, max_new_tokens, temperature, top_p, stop, seed, prompt_file,
             prompts_file, field, batch_size, output, resume, force, pruned_prefill, runtime, onnx_dir, onnx_full, eager,
             compile_, quiet):
    """generate --prompts: every prompt of a JSONL file, in batches, answers appended to -o."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from griffin_export.runtime.answers import AnswerWriter, digest, finished
    from griffin_export.bundle.format import read_bundle, read_metadata
    from griffin_export.files.inputs import iter_prompts
    from griffin_export.files.outputs import check_output_path
    from griffin_export.runtime.pytorch import load_runtime

    if prompt_file is not None:
        raise click.UsageError("--prompt-file is one prompt, --prompts many: give one of them")
    if output is None:
        raise click.UsageError("--prompts writes its answers to a JSONL file: give -o FILE.jsonl")
    if resume and force:
        raise click.UsageError("--resume keeps the answers in -o, --force overwrites them: choose one")
    if compile_:
        raise click.UsageError("--compile compiles the batch-1 lean step; batches run it uncompiled")
    if runtime == "onnx" and onnx_dir is None:
        raise click.UsageError("--runtime onnx needs --onnx DIR (a graph from griffin-export onnx)")
    opts = DecodeOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                         seed=seed)
    prompts = list(iter_prompts([prompts_file], field))  # every line checked (file:line named) before any work
    wheres = [p.where for p in prompts]
    texts = [p.text for p in prompts]
    meta, _ = read_metadata(bundle)
    # what makes an answer: the bundle (its metadata names model, experts and settings) and how it decodes
    run = digest(meta, opts.__dict__, pruned_prefill, runtime)
    out = Path(output)
    done = finished(out, texts, run) if resume and out.exists() else set()
    if not resume:
        check_output_path(out, force)
    todo = [i for i in range(len(prompts)) if i not in done]
    b = read_bundle(bundle, load_kv=False)
    status(f"{len(prompts)} prompts, {len(done)} answered already; loading {model or b.info.base_model} ...", quiet)
    if runtime == "onnx":
        require_extra("onnx", ("onnxruntime",))
        from griffin_export.runtime.onnx import load_onnx_runtime

        rt = load_onnx_runtime(onnx_dir, b, full=onnx_full, new_prompts=True, pruned_prefill=pruned_prefill,
                               source=str(bundle))
    else:
        rt = load_runtime(b, model, gguf_file=gguf_file, device=device, new_prompts=True,
                          pruned_prefill=pruned_prefill, lean=False if eager else None, source=str(bundle))
    writer = AnswerWriter(out, run, append=resume)
    bar = tqdm(total=len(todo), desc="generate", unit="prompt", disable=quiet)
    tokens = 0

    def on_done(j: int, gen) -> None:
        nonlocal tokens
        writer.write(todo[j], wheres[todo[j]], texts[todo[j]], gen)
        tokens += len(gen.token_ids)
        bar.update(1)
        bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s")

    try:
        rt.generate_batch([prompts[i].text for i in todo], opts, batch_size=batch_size, on_done=on_done,
                          names=[wheres[i] for i in todo])
    finally:
        bar.close()
        writer.close()
    status(f"wrote {out}: {len(todo)} answers ({tokens} tokens){f', {len(done)} kept' if done else ''}", quiet)
