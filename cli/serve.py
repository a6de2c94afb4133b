from __future__ import annotations

import ipaddress
import sys

import click

from griffin_export.registry import SERVE_BACKENDS
from griffin_export.settings import GGUF_QUANTS, SERVE_ENGINES, ServeSettings, defaults

from .options import recorded_model_options, require_extra, status, threads_option

SERVE = defaults(ServeSettings)


@click.command("serve")
@click.argument("bundles", metavar="[BUNDLE...]", nargs=-1)
@click.option("--router", default=None, metavar="ROUTER",
              help="a router (griffin-export discover) and the class bundles beside it: model \"auto\" routes each "
                   "request to its class")
@click.option("--backend", type=click.Choice(list(SERVE_BACKENDS)), default=SERVE["backend"], show_default=True,
              help="torch: one base model, every class's FF slices, continuous batching; llama.cpp: each class's "
                   "pruned GGUF; onnx: each class's lean graph")
@recorded_model_options
@click.option("--no-guard", is_flag=True, help="--router: every prompt to its nearest class, even one that fits none")
@click.option("--host", default=SERVE["host"], show_default=True,
              help="the address to listen on (0.0.0.0: every interface; give an --api-key then)")
@click.option("--port", default=SERVE["port"], show_default=True, type=click.IntRange(0, 65535),
              help="the port (0: any free one, printed)")
@click.option("--api-key", default=None, envvar="GRIFFIN_EXPORT_API_KEY", show_envvar=True, metavar="KEY",
              help="requests to /v1 must send Authorization: Bearer KEY (the environment keeps it out of `ps`)")
@click.option("--max-body-bytes", default=SERVE["max_body_bytes"], show_default=True, type=click.IntRange(min=1),
              help="a larger request body is refused (413)")
@click.option("--max-batch", default=SERVE["max_batch"], show_default=True, type=click.IntRange(min=1),
              help="requests of one class decoded together")
@click.option("--max-waiting", default=SERVE["max_waiting"], show_default=True, type=click.IntRange(min=1),
              help="requests queued past the batches; more are refused (429)")
@click.option("--prefill-tokens", default=SERVE["prefill_tokens"], show_default=True, type=click.IntRange(min=1),
              help="prompt tokens one class prefills between two decode steps (one prompt at least)")
@click.option("--max-tokens", default=SERVE["max_tokens"], show_default=True, type=click.IntRange(min=1),
              help="tokens a request that gives no max_tokens gets, within the context")
@click.option("--drain-seconds", "drain_s", default=SERVE["drain_s"], show_default=True, type=click.FloatRange(min=0),
              help="on SIGTERM, how long requests in flight may take to finish (new ones get 503)")
@click.option("--gguf-dir", default=None, metavar="DIR",
              help="--backend llama.cpp: where the classes' GGUF files are written (or found again)")
@click.option("--gguf-quant", type=click.Choice(GGUF_QUANTS), default=SERVE["gguf_quant"], show_default=True,
              help="--backend llama.cpp: the GGUF files' type")
@click.option("--onnx-dir", default=None, metavar="DIR",
              help="--backend onnx: where the classes' lean graphs are written (or found again)")
@click.option("--engine", type=click.Choice(SERVE_ENGINES), default=SERVE["engine"], show_default=True,
              help="ray: the same app on Ray Serve, --replicas copies (a local cluster unless --address)")
@click.option("--replicas", default=SERVE["replicas"], show_default=True, type=click.IntRange(min=1),
              help="--engine ray: copies of the server, each with its own model")
@click.option("--address", default=None, help="--engine ray: the cluster to join (e.g. auto)")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="print only the address served")
def command(bundles, router, backend, model, gguf_file, device, no_guard, host, port, api_key, max_body_bytes,
            max_batch, max_waiting, prefill_tokens, max_tokens, drain_s, gguf_dir, gguf_quant, onnx_dir, engine,
            replicas, address, threads, quiet):
    """Serve class experts over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions
    (streamed or not), /v1/models and /health.

    The models are the classes, "full" (the full model) and, with --router, "auto": each request is
    routed to its class (or, where the guard fires, the full model). Requests of one class decode
    together. SIGTERM drains: requests in flight finish, new ones get 503.

    \b
    Examples:
      griffin-export serve --router classes/router.safetensors
      griffin-export serve classes/class-1.safetensors classes/class-2.safetensors --port 8001
      GRIFFIN_EXPORT_API_KEY=secret griffin-export serve --router classes/router.safetensors --host 0.0.0.0
      griffin-export serve --router classes/router.safetensors --backend llama.cpp --gguf-dir classes/gguf/
      griffin-export serve --router classes/router.safetensors --engine ray --replicas 2
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "auto", "prompt": "def add(a, b):", "max_tokens": 32}'
    """
    require_extra("serve")
    if engine == "ray":
        require_extra("ray", ("ray",))
    settings = ServeSettings(router=router, bundles=tuple(bundles), backend=backend, model=model, gguf_file=gguf_file,
                             device=device, guard=not no_guard, host=host, port=port, api_key=api_key,
                             max_body_bytes=max_body_bytes, max_batch=max_batch, max_waiting=max_waiting,
                             prefill_tokens=prefill_tokens, max_tokens=max_tokens, drain_s=drain_s, threads=threads,
                             gguf_dir=gguf_dir, gguf_quant=gguf_quant, onnx_dir=onnx_dir, engine=engine,
                             replicas=replicas, address=address)
    if not _loopback(host) and api_key is None:
        status(f"griffin-export: warning: listening on {host} without --api-key: anyone who reaches it may use it",
               quiet)
    from griffin_export.serve.server import serve

    def ready(url: str) -> None:
        click.echo(url if quiet else f"serving on {url} (backend {backend}{', API key required' if api_key else ''}); "
                   "SIGTERM drains, Ctrl-C stops")
        sys.stdout.flush()  # a pipe or a file sees it now, not when the server stops

    serve(settings, report=lambda line: status(line, quiet), ready=ready)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
