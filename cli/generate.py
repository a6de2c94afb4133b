from __future__ import annotations

import sys

import click

from griffin_export.registry import GENERATE_RUNTIMES
from griffin_export.settings import KV_DTYPES, TORCH_KV_DTYPE, DecodeOptions, RuntimeOptions, defaults

from .options import decode_options, recorded_model_options, status, threads_option

RUNTIME = defaults(RuntimeOptions)


@click.command("generate")
@click.argument("bundles", metavar="[BUNDLE]", nargs=-1)
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
@click.option("--runtime", type=click.Choice(GENERATE_RUNTIMES), default=RUNTIME["runtime"], show_default=True,
              help="onnx: ONNX Runtime on a graph from `griffin-export onnx` (CUDA if a GPU answers, else CPU)")
@click.option("--onnx", "onnx_dir", default=None, metavar="DIR", help="--runtime onnx: the bundle's graph directory")
@click.option("--onnx-full", default=None, metavar="DIR",
              help="--runtime onnx: a graph from `griffin-export onnx --full`, for the prefill of --prompt-file")
@click.option("--eager", is_flag=True,
              help="--runtime torch: decode through transformers' forward instead of the lean step (runtime/lean.py)")
@click.option("--compile", "compile_", is_flag=True,
              help="--runtime torch: torch.compile the lean step (CUDA graphs on a GPU; on a CPU it measured no faster)")
@click.option("--router", default=None, metavar="ROUTER",
              help="instead of a BUNDLE: class experts per prompt, from a router (griffin-export discover) and the "
                   "class bundles beside it; each prompt's class, prefilled and decoded through its experts")
@click.option("--no-guard", is_flag=True,
              help="--router: every prompt to its nearest class, even one that fits none (else it runs the full model)")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPES), default=None,
              help=f"--runtime torch: the lean step's KV cache type, float32 or float16 [default: {TORCH_KV_DTYPE}]; "
                   "--runtime onnx: the graph's own (set at export; another one is refused)")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="print only the generated text")
def command(bundles, model, gguf_file, device, max_new_tokens, temperature, top_p, stop, seed, prompt_file,
            prompts_file, field, batch_size, output, resume, force, pruned_prefill, runtime, onnx_dir, onnx_full, eager,
            compile_, router, no_guard, kv_dtype, threads, quiet):
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
      griffin-export generate expert.safetensors --kv-dtype float16
      griffin-export generate expert.safetensors --runtime onnx --onnx expert_onnx/ --onnx-full full_onnx/ --prompt-file new.txt
      griffin-export generate news.safetensors --prompts queue.jsonl --batch-size 16 -o answers.jsonl
      griffin-export generate news.safetensors --prompts queue.jsonl -o answers.jsonl --resume   # after an interruption
      griffin-export generate --router classes/router.safetensors --prompts queue.jsonl -o answers.jsonl
      griffin-export generate --router classes/router.safetensors --prompt-file new.txt
    """
    if bool(bundles) == bool(router):
        raise click.UsageError("give a BUNDLE, or --router for class experts per prompt (one of the two)")
    if no_guard and not router:
        raise click.UsageError("--no-guard goes with --router")
    if len(bundles) > 1:  # one run decodes with one bundle's experts: a batch shares its weights
        raise click.UsageError(f"generate takes one BUNDLE, got {len(bundles)}: a batch decodes with one bundle's "
                               "experts (mixing bundles would mix weights); run one generate per bundle")
    from griffin_export.files.inputs import read_prompt

    bundle = bundles[0] if bundles else None
    opts = DecodeOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                         seed=seed)
    options = RuntimeOptions(runtime=runtime, model=model, gguf_file=gguf_file, device=device,
                             lean=False if eager else None, compile=compile_, graph_dir=onnx_dir, full_graph_dir=onnx_full,
                             router=router, guard=not no_guard, pruned_prefill=pruned_prefill, threads=threads,
                             kv_dtype=kv_dtype)
    if prompts_file is not None:
        if prompt_file is not None:
            raise click.UsageError("--prompt-file is one prompt, --prompts many: give one of them")
        if output is None:
            raise click.UsageError("--prompts writes its answers to a JSONL file: give -o FILE.jsonl")
        from griffin_export.runtime.answers import generate_file

        done = generate_file(bundle, prompts_file, output, options, opts, field=field, batch_size=batch_size,
                             resume=resume, force=force, progress=not quiet, quiet=quiet,
                             report=lambda line: status(line, quiet))
        st = done.stats
        status(f"wrote {done.path}: {done.written} answers ({st.tokens} tokens) in {done.seconds:.1f} s: prefill "
               f"{st.prefill_s:.1f} s, decoding {st.decode_tok_s(done.seconds):.1f} tok/s"
               + (f"; {done.kept} kept from before" if done.kept else ""), quiet)
        return
    if output or resume or force:
        raise click.UsageError("-o, --resume and --force are for --prompts")
    from griffin_export.bundle.format import read_info
    from griffin_export.errors import GriffinError
    from griffin_export.runtime.opening import open_runtime

    prompt = read_prompt(prompt_file) if prompt_file else None
    if router and prompt is None:
        raise GriffinError("a router has no prompt of its own: give one with --prompt-file (or many with --prompts)")
    info = read_info(bundle) if bundle else None
    if info is not None and info.kind == "class" and prompt is None:
        raise GriffinError(f"{bundle} is a class bundle ({info.extra.get('class', '?')}): it has no prompt of its "
                           "own; give one with --prompt-file")
    rt = open_runtime(bundle, options, new_prompts=prompt is not None, max_new_tokens=max_new_tokens, quiet=quiet)

    def show(piece: str) -> None:  # streamed, so an interrupted run keeps what it printed
        click.echo(piece, nl=False)
        sys.stdout.flush()

    out = rt.generate(opts, prompt=prompt, on_text=show if rt.tokenizer is not None else None)
    dt = out.decode_s  # the decoding loop alone: a new prompt's prefill is not decode speed
    click.echo("")
    # the bundle's warm-up tokens start the output but cost no decoding here
    warm = 0 if prompt is not None else min(rt.bundle.info.warmup_tokens, len(out.token_ids))
    decoded = len(out.token_ids) - warm
    routed = out.extra
    status(f"[{decoded} tokens in {dt:.2f} s, {decoded / max(dt, 1e-9):.1f} tok/s"
           + (f", after {warm} warm-up tokens from the bundle" if warm else "")
           + (f", class {routed['class']}" + (" (guard: fits no class)" if routed["guarded"] else "") if routed else "")
           + f", stop: {out.stop_reason}]", quiet)
