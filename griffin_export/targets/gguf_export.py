"""A bundle baked into a standalone GGUF file that llama.cpp runs.

    griffin-export checkpoint expert.safetensors --gguf -o pruned.gguf --quant Q4_1

The base model must itself be a GGUF file (the default model is): every tensor and every
metadata key of it is carried over (tokenizer, chat template, rope and norm settings) except
the FF weights, which come from the bundle under the names the `gguf` package's tensor-name map
gives their Hugging Face names, and `{arch}.feed_forward_length`, which becomes the bundle's k
(llama.cpp reads it as one number or as a per-layer array, so per-layer widths work). The
file is first written in float32 (the base's quantized tensors dequantized, so no tensor is
quantized twice on our side), then llama.cpp's own quantizer (llama_model_quantize, through
llama-cpp-python) writes the requested type with its usual per-tensor choices. Like the
Hugging Face checkpoint, every token, the prompt's included, runs through the experts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ..bundle.experts import check_bundle
from ..bundle.format import Bundle, BundleInfo, read_bundle, read_info
from ..errors import GriffinError
from ..files.outputs import atomic_output, check_output_path
from ..method.budget import ff_width_text
from ..model.arch import spec_for
from ..model.load import load_model, resolve_model
from ..settings import GGUF_QUANT, GGUF_QUANTS, check_gguf_quant, require_llama_cpp

if TYPE_CHECKING:
    from gguf import GGUFReader

KEY_PREFIX = "griffin."  # the provenance keys this writer adds
_SKIP = ("GGUF.", "general.architecture", "general.file_type")  # written by GGUFWriter / set below


def check_architecture(architecture: str) -> None:
    """Refuse, before any work, a bundle whose architecture llama.cpp does not run."""
    if not spec_for(architecture).llama_cpp:
        raise GriffinError(f"llama.cpp does not run {architecture!r} models, so there is no GGUF to write; "
                           "write a Hugging Face checkpoint or an ONNX graph instead")


def _field_value(field):
    from gguf import GGUFValueType

    value = field.contents()
    vtype = field.types[0]
    sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
    return value, vtype, sub


def gguf_names(bundle: Bundle, arch: str, n_layers: int) -> dict[str, str]:
    """Each bundle tensor's GGUF name (blk.3.ffn_gate.weight), from the gguf package's map."""
    import gguf

    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if model_arch is None:
        raise GriffinError(f"the gguf package has no tensor map for architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(model_arch, n_layers)
    names = {}
    for name in bundle.weights:
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise GriffinError(f"bundle tensor {name} has no GGUF name in llama.cpp's {arch} tensor map")
        names[name] = g
    return names


def pruned_gguf_f32(bundle: Bundle, base: Path, out: Path, *, source: str = "bundle", progress: bool = False) -> list[int]:
    """Write `base` with the bundle's FF weights as an all-float32 GGUF at `out`; returns the widths."""
    import gguf
    from tqdm.auto import tqdm

    reader = gguf.GGUFReader(str(base))
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GriffinError(f"{base} has no general.architecture key; not a model GGUF")
    arch = field.contents()
    info = bundle.info
    blocks = reader.fields.get(f"{arch}.block_count")
    if blocks is None or int(blocks.contents()) != info.num_layers:
        raise GriffinError(f"{base} has {blocks.contents() if blocks else '?'} layers; bundle {source} has {info.num_layers}")
    names = gguf_names(bundle, arch, info.num_layers)
    tensors = {t.name: t for t in reader.tensors}
    replace = {}
    for name, g in names.items():
        if g not in tensors:
            raise GriffinError(f"{base} has no tensor {g} (bundle tensor {name})")
        want = [int(x) for x in reversed(tensors[g].shape.tolist())]  # numpy order: [out, in]
        got = list(bundle.weights[name].shape)
        if len(got) != len(want) or sum(a != b for a, b in zip(got, want)) > 1:
            raise GriffinError(f"bundle tensor {name} {got} does not fit {base}'s {g} {want}")
        replace[g] = bundle.weights[name].detach().float().contiguous().numpy()

    writer = gguf.GGUFWriter(str(out), arch)
    ff_key = f"{arch}.feed_forward_length"
    for key, f in reader.fields.items():
        if key.startswith(_SKIP) or key == ff_key or key.startswith(KEY_PREFIX):
            continue
        value, vtype, sub = _field_value(f)
        writer.add_key_value(key, value, vtype, sub)
    widths = list(info.k)
    writer.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in (("base_model", info.base_model), ("base_fingerprint", info.base_fingerprint),
                       ("method", info.method), ("density", str(info.density)), ("kind", info.kind),
                       ("base_d_ff", str(info.d_ff))):
        writer.add_string(KEY_PREFIX + key, value)
    for t in tqdm(reader.tensors, desc="gguf tensors", disable=not progress, leave=False):
        arr = replace.get(t.name)
        if arr is None:
            arr = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            arr = arr.reshape([int(x) for x in reversed(t.shape.tolist())])
        writer.add_tensor(t.name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return widths


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """llama.cpp logs from C to file descriptor 2; keep that out of the terminal."""
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def last_log_line(log: Path) -> str | None:
    """The last non-empty line llama.cpp wrote to `log` (its reason for a refusal), if any."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return lines[-1] if lines else None


def file_type(path: Path) -> str | None:
    """A GGUF's general.file_type as a --quant name (Q4_1, F32, ...), None if unset or another."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return None
    quant = gguf.LlamaFileType(int(field.contents())).name.partition("_")[2]  # MOSTLY_Q4_1 -> Q4_1, ALL_F32 -> F32
    return quant if quant in GGUF_QUANTS else None


def llama_quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer, as its llama-quantize tool runs it (a quantized `src` is
    dequantized first, as llama-quantize --allow-requantize does)."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if quant == "F32" else f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads or 0
    params.allow_requantize = True
    log = dst.with_name(dst.name + ".log")
    try:
        with stderr_to(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0:
            raise GriffinError(f"llama.cpp could not quantize to {quant}: {last_log_line(log) or f'code {rc}'}")
    finally:
        log.unlink(missing_ok=True)


def base_gguf(model: str | None, gguf_file: str | None, info: BundleInfo | None) -> Path:
    """The base model's GGUF file, or a one-line refusal for a Hugging Face directory."""
    directory, name, _ = resolve_model(model or info.base_model, gguf_file)
    if name is None:
        raise GriffinError(f"a GGUF export carries the tokenizer and settings over from a GGUF base model; the base "
                           f"{model or info.base_model} is a Hugging Face directory (convert it with llama.cpp's "
                           "convert_hf_to_gguf.py and pass model=FILE.gguf)")
    return directory / name


def write_pruned_gguf(bundle: Bundle, base: Path, output: str | os.PathLike, quant: str = "Q4_1", *,
                      force: bool = False, threads: int | None = None, source: str = "bundle",
                      progress: bool = False) -> Path:
    """The pruned GGUF at `output` (atomically: nothing is left behind on failure)."""
    check_architecture(bundle.info.architecture)
    check_gguf_quant(quant)
    output = check_output_path(output, force)
    if quant != "F32":
        require_llama_cpp()
    with atomic_output(output) as tmp:
        if quant == "F32":
            pruned_gguf_f32(bundle, base, tmp, source=source, progress=progress)
        else:
            with tempfile.TemporaryDirectory(dir=output.parent, prefix=".griffin-gguf.") as work:
                f32 = Path(work) / "f32.gguf"
                pruned_gguf_f32(bundle, base, f32, source=source, progress=progress)
                llama_quantize(f32, tmp, quant, threads)
    return output


def export_gguf(bundle: str | os.PathLike, output: str | os.PathLike, *, model: str | None = None,
                gguf_file: str | None = None, quant: str = GGUF_QUANT, threads: int | None = None, force: bool = False,
                progress: bool = False, report: Callable[[str], None] | None = None) -> Path:
    """A bundle file as one pruned GGUF at `output`: its base GGUF (`model`, else the one the bundle
    records) is checked against the bundle by fingerprint, then written with the bundle's FF weights
    and quantized by llama.cpp. Everything that can be refused without the model is refused first."""
    info = read_info(bundle)
    check_architecture(info.architecture)
    check_gguf_quant(quant)
    check_output_path(output, force)
    if quant != "F32":
        require_llama_cpp()
    base = base_gguf(model, gguf_file, info)
    if report is not None:
        report(f"checking {base.name} against the bundle ...")
    lm = load_model(str(base), dtype=info.dtype, quiet=not progress)
    check_bundle(lm, info, str(bundle))  # the same base model, by fingerprint
    del lm
    return write_pruned_gguf(read_bundle(bundle, load_kv=False), base, output, quant, force=force, threads=threads,
                             source=str(bundle), progress=progress)


# -- GGUF files (GGUFReader maps the file and parses the header and tensor table, no tensor data) --

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """By suffix, or by magic for a GGUF named otherwise (a corrupt .gguf is then refused as GGUF)."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False  # the bundle path names what is wrong with it


def _gguf_reader(path: Path) -> GGUFReader:
    from gguf import GGUFReader

    if not path.is_file():
        raise GriffinError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure of the user's file is a bad input
        raise GriffinError(f"{path} is not a valid GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None


def _gguf_file_type(value: int | None) -> str | None:
    """general.file_type as the name llama.cpp's tools use: 3 -> Q4_1, 0 -> F32."""
    from gguf import LlamaFileType

    if value is None:
        return None
    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return f"unknown ({value})"
    return name.partition("_")[2] or name  # MOSTLY_Q4_1 -> Q4_1, ALL_F32 -> F32


def describe_gguf(path: str | os.PathLike) -> dict:
    """A GGUF file, ours (checkpoint --gguf: with the griffin.* provenance keys) or any other."""

    path = Path(path)
    reader = _gguf_reader(path)

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "format": "gguf",
        "gguf_version": value("GGUF.version"),
        "architecture": arch,
        "name": value("general.name"),
        "file_type": _gguf_file_type(value("general.file_type")),
        "layers": value(f"{arch}.block_count"),
        "hidden_size": value(f"{arch}.embedding_length"),
        "feed_forward_length": value(f"{arch}.feed_forward_length"),  # one number, or one per layer
        "context_length": value(f"{arch}.context_length"),
        "metadata_keys": sum(not k.startswith("GGUF.") for k in reader.fields),
        "tensors": {"count": len(reader.tensors), "bytes": sum(int(t.n_bytes) for t in reader.tensors),
                    "types": dict(types.most_common())},
        "griffin": {k.removeprefix(KEY_PREFIX): value(k) for k in reader.fields if k.startswith(KEY_PREFIX)} or None,
    }


def format_gguf(s: dict) -> str:
    g = s["griffin"] or {}
    t = s["tensors"]
    types = ", ".join(f"{name} {n}" for name, n in t["types"].items())
    pruned = " (pruned by griffin-export)" if g else ""
    name = f" ({s['name']})" if s["name"] else ""
    lines = [
        f"{s['file']}: GGUF v{s['gguf_version']}{pruned}, {s['file_bytes']:,} bytes",
        (f"  architecture {s['architecture'] or '?'}{name}, file type {s['file_type'] or '?'}, "
         f"{s['layers'] or '?'} layers, hidden {s['hidden_size'] or '?'}, context {s['context_length'] or '?'}"),
        f"  FF width     {ff_width_text(s['feed_forward_length'], s['layers'], g.get('base_d_ff'))}",
        (f"  tensors      {t['count']} tensors, {t['bytes']:,} bytes ({types or 'none'}); "
         f"{s['metadata_keys']} metadata keys"),
    ]
    if g:
        lines += [
            f"  base model   {g.get('base_model', '?')}",
            f"  fingerprint  {g.get('base_fingerprint', '?')}",
            f"  selection    {g.get('method', '?')}, density {g.get('density', '?')} ({g.get('kind', '?')} bundle)",
        ]
    return "\n".join(lines)


def owns(path: Path) -> bool:
    return path.is_file() and is_gguf(path)


def describe(path: str | os.PathLike) -> tuple[dict, str]:
    """(summary, text) of a GGUF file from its header and tensor table (griffin-export inspect)."""
    s = describe_gguf(path)
    return s, format_gguf(s)
