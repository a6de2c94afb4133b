"""Every class of a router as one export target, in one folder, with the router and its bundles beside them.

    export_class_set("classes/router.safetensors", "deploy/", "hf")
    # deploy/router.safetensors, deploy/{class}.safetensors (the bundles), deploy/{class}/ (the checkpoints)

The folder is self-contained: the router still finds the bundles it was made with (by name and digest),
so `generate --router deploy/router.safetensors` and `serve --router` run from it, and each class's
checkpoint (a HF directory, a .gguf file, or an ONNX graph directory) sits under the class's name.
The folder is written whole or not at all.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..classes.router import check_router_bundles, read_router
from ..errors import GriffinError
from ..files.outputs import atomic_dir, check_output_dir
from ..registry import TARGETS, one_of

__all__ = ["ROUTER_FILE", "class_output_name", "export_class_set"]

ROUTER_FILE = "router.safetensors"


def class_output_name(name: str, target: str) -> str:
    """A class's checkpoint inside the set: the class name, a .gguf file for llama.cpp."""
    return f"{name}.gguf" if target == "gguf" else name


def _check_names(router_path: Path, names: list[str], bundles: list[str]) -> None:
    # class names become file names in the set: nothing that climbs out of it or collides with a bundle
    for name in names:
        if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise GriffinError(f"{router_path}: class name {name!r} cannot name a file in the output folder")
    taken = {Path(b).parts[0] for b in bundles} | {ROUTER_FILE}
    clash = {n for n in names if n in taken or f"{n}.gguf" in taken}
    if clash:
        raise GriffinError(f"{router_path}: {sorted(clash)} would name both a class's checkpoint and a bundle file")


def export_class_set(router: str | os.PathLike, output: str | os.PathLike, target: str = "hf", *, force: bool = False,
                     report: Callable[[str], None] | None = None, **options) -> Path:
    """Write each class of `router` as `target` (a TARGETS name: hf, gguf, onnx) into the folder `output`,
    with a copy of the router and of its class bundles. `options` go to the target's writer (model,
    gguf_file, quant, graph, ...). Everything is checked before the first class is written: the router,
    its bundles' digests, the class names as file names, the output folder."""
    target = one_of(target, TARGETS, "target")
    router_path = Path(router)
    r = read_router(router_path)
    check_router_bundles(r)
    _check_names(router_path, r.info.classes, r.info.bundles)
    output = check_output_dir(output, force, ROUTER_FILE)
    write = TARGETS[target].write
    say = report or (lambda line: None)
    with atomic_dir(output) as tmp:
        shutil.copy2(router_path, tmp / ROUTER_FILE)
        for rel, b in zip(r.info.bundles, r.bundle_paths()):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(b, tmp / rel)
        for i, (name, bundle) in enumerate(zip(r.info.classes, r.bundle_paths()), 1):
            say(f"class {name} ({i}/{len(r.info.classes)}): {target} ...")
            out = tmp / class_output_name(name, target)
            write(bundle, out, **options)
    return output
