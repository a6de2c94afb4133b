"""Opening a runtime: a bundle on the runtime the options name (registry.RUNTIMES), or with a router
each prompt's class experts (runtime/routed.py). Above every runtime's module, so none of them imports
back up to choose among the others."""

from __future__ import annotations

import os
import sys

from ..bundle.format import Bundle, read_bundle, read_info
from ..errors import GriffinError
from ..model.load import use_threads
from ..registry import runtime
from ..settings import RuntimeOptions, require_runtime
from .base import Runtime
from .routed import load_routed

__all__ = ["open_runtime"]


def open_runtime(bundle: str | os.PathLike | Bundle | None, options: RuntimeOptions | None = None, *,
                 new_prompts: bool = False, max_new_tokens: int | None = None, quiet: bool = True) -> Runtime:
    """A bundle on the runtime `options.runtime` names (registry.RUNTIMES, its module's `load`), for
    generating from the bundle's own prompt or, with new_prompts, from new ones. The bundle is read and
    checked whole before anything loads (its KV only where it will be used); with max_new_tokens the
    bundle's own prompt is checked to leave room for them, before the weights load where it can be.

        rt = open_runtime("expert.safetensors", RuntimeOptions(runtime="onnx", graph_dir="expert_onnx/"))
        print(rt.generate(DecodeOptions(max_new_tokens=64)).text)
    """
    options = options or RuntimeOptions()
    require_runtime(options.runtime, f"the {options.runtime} runtime")
    if options.router is not None:  # class experts per prompt: the bundles are the router's
        if bundle is not None:
            raise GriffinError("a router brings its class bundles: give a bundle or a `router`, not both")
        if not quiet:
            print(f"loading the router {options.router} and its classes ...", file=sys.stderr)
        use_threads(options.threads)
        return load_routed(options.router, options.model, gguf_file=options.gguf_file, device=options.device,
                           guard=options.guard, lean=options.lean, quiet=quiet, kv_dtype=options.kv_dtype)
    if bundle is None:
        raise GriffinError("give a bundle, or a `router` (griffin-export discover) for class experts per prompt")
    source = "bundle" if isinstance(bundle, Bundle) else str(bundle)
    if not isinstance(bundle, Bundle):
        info = read_info(bundle)
        if info.kind == "class" and not new_prompts:
            raise GriffinError(f"{source} is a class bundle ({info.extra.get('class', '?')}): it has no prompt of its "
                               "own; give it new prompts")
        bundle = read_bundle(bundle, load_kv=not (new_prompts or options.pruned_prefill))
    return runtime(options.runtime).code().load(bundle, options, new_prompts=new_prompts,
                                               max_new_tokens=max_new_tokens, source=source, quiet=quiet)
