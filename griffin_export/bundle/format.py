"""The expert bundle: the one place that knows its tensor names and metadata keys.

A bundle is a safetensors file:
  <base param name>              sliced FF weights, e.g. model.layers.3.mlp.gate_proj.weight [k, hidden]
  griffin.indices.{i}            int64 [k], sorted kept-neuron indices of layer i
  griffin.kv.{i}.key / .value    the prompt's KV cache of layer i, [1, kv_heads, T, head_dim]
  griffin.prompt_ids             int64 [T]
  griffin.warmup_ids             int64 [W], tokens the full model generated after the prompt at export
                                 (export --warmup); the KV and last_logits then cover them too
  griffin.last_logits            float32 [vocab], logits at the last cached position
and str->str metadata (BundleInfo). Writes go to a temp file renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GriffinError
from ..files.outputs import atomic_output, check_output_path
from ..model.arch import expected_shapes, ff_param, spec_for

__all__ = ["Bundle", "BundleInfo", "read_bundle", "read_info", "read_metadata", "write_bundle"]

FORMAT = "griffin-expert"
FORMAT_VERSION = "1"
# Version 2 = version 1 plus warm-up tokens. Only bundles that have them say "2", so an older
# griffin-export refuses them instead of generating without their first tokens.
WARMUP_FORMAT_VERSION = "2"
READ_VERSIONS = (FORMAT_VERSION, WARMUP_FORMAT_VERSION)

INDICES = "griffin.indices.{}"
KV_KEY = "griffin.kv.{}.key"
KV_VALUE = "griffin.kv.{}.value"
PROMPT_IDS = "griffin.prompt_ids"
LAST_LOGITS = "griffin.last_logits"
WARMUP_IDS = "griffin.warmup_ids"


def tensor_role(name: str) -> str:
    """What a bundle tensor holds, from its name: "kv", "indices", "prompt" (prompt and warm-up ids,
    last logits) or "weights" (the base model's FF parameter names)."""
    if name.startswith(KV_KEY.split("{")[0]):
        return "kv"
    if name.startswith(INDICES.split("{")[0]):
        return "indices"
    return "prompt" if name in (PROMPT_IDS, LAST_LOGITS, WARMUP_IDS) else "weights"


def str_metadata(info) -> dict[str, str]:
    """A metadata dataclass as str->str (safetensors and ONNX metadata_props): lists
    comma-joined, bools as true/false, its `extra` dict as extra.* keys."""
    meta = {}
    for f in dataclasses.fields(info):
        value = getattr(info, f.name)
        if f.name == "extra":
            continue
        if f.type in _JSON_LISTS:  # names may hold commas: a JSON list
            value = json.dumps(value)
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        meta[f.name] = str(value)
    meta.update({f"extra.{k}": v for k, v in info.extra.items()})
    return meta


def check_format(meta: dict[str, str], source: str, fmt: str, versions: tuple[str, ...], what: str) -> None:
    """Refuse metadata of another format or version (what: "bundle" or "graph")."""
    if meta.get("format") != fmt:
        raise GriffinError(f"{source} is not a griffin-export {what} (format={meta.get('format')!r})")
    if meta.get("format_version") not in versions:
        raise GriffinError(f"{source} has {what} format version {meta.get('format_version')!r}; this griffin-export "
                           f"reads version {' or '.join(versions)} — re-export the {what} with this version")


_JSON_LISTS = {"list[str]": str, "list[float]": float}


def _json_list(raw: str, kind: type) -> list:
    """A JSON list whose every element is a `kind` (ints pass as floats); ValueError otherwise."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(raw) from None
    ok = isinstance(value, list) and all(isinstance(v, kind) or (kind is float and type(v) is int) for v in value)
    if not ok:
        raise ValueError(raw)
    return [kind(v) for v in value]


def read_file(path: str | os.PathLike, fmt: str, versions: tuple[str, ...], what: str
              ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, every tensor) of one of the house's safetensors files other than bundles (a class
    statistic, a router, a log's statistics), its format and version checked; any failure to parse
    it is one line naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GriffinError(f"{what} {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            check_format(meta, str(path), fmt, versions, what)
            return meta, {n: f.get_tensor(n) for n in f.keys()}
    except GriffinError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of the user's file
        raise GriffinError(f"{path} is not a readable {what}: {str(e).splitlines()[0] if str(e) else e}") from None


def parse_metadata(cls, meta: dict[str, str], source: str):
    """The inverse of str_metadata for dataclass `cls`: typed fields from strings. Fields with
    defaults may be missing; the others must be there and parse."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        if f.name not in meta:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise GriffinError(f"{source}: metadata key {f.name!r} is missing")
        raw = meta[f.name]
        try:
            if f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            elif f.type == "bool":
                values[f.name] = raw == "true"
            elif f.type == "list[int]":
                values[f.name] = [int(x) for x in raw.split(",")] if raw else []
            elif f.type in _JSON_LISTS:
                values[f.name] = _json_list(raw, _JSON_LISTS[f.type])
            else:
                values[f.name] = raw
        except ValueError:
            raise GriffinError(f"{source}: metadata {f.name}={raw!r} is not a valid {f.type}") from None
    extra = {k[len("extra."):]: v for k, v in meta.items() if k.startswith("extra.")}
    return cls(**values, extra=extra)


@dataclass
class BundleInfo:
    """Bundle metadata. Every field is stored as a string; `k` per layer as a comma list."""

    base_model: str
    base_fingerprint: str
    architecture: str
    dtype: str
    num_layers: int
    d_ff: int
    hidden_size: int
    k: list[int]
    density: float
    method: str
    seed: int
    prompt_tokens: int
    tokenizer: str
    has_kv: bool
    kind: str = "prompt"  # "prompt": one prompt's experts (+KV); "class": many prompts'
    chat: bool = False
    warmup_tokens: int = 0  # full-model tokens after the prompt (griffin.warmup_ids), in the KV
    tool_version: str = ""
    format: str = FORMAT
    format_version: str = FORMAT_VERSION
    extra: dict[str, str] = field(default_factory=dict)  # e.g. class name, aggregation

    def to_metadata(self) -> dict[str, str]:
        return str_metadata(self)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> "BundleInfo":
        check_format(meta, source, FORMAT, READ_VERSIONS, "bundle")
        return parse_metadata(cls, meta, source)


@dataclass
class Bundle:
    """An expert bundle in memory: the kept neurons' FF weights of every layer, and for a prompt's
    bundle its tokens, KV cache and last logits (a class bundle has none).

        bundle = read_bundle("expert.safetensors")
        bundle.info.k, bundle.info.base_model        # widths per layer, where it came from
        bundle.weights["model.layers.0.mlp.down_proj.weight"].shape   # [hidden, k]
    """

    info: BundleInfo
    indices: list[torch.Tensor]  # per layer, int64 [k_i], sorted
    weights: dict[str, torch.Tensor]  # sliced FF tensors by base-model parameter name
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (key, value)
    prompt_ids: torch.Tensor | None = None  # int64 [T]
    last_logits: torch.Tensor | None = None  # float32 [vocab]
    warmup_ids: torch.Tensor | None = None  # int64 [W]

    @property
    def cached_tokens(self) -> int:
        """Positions the KV cache holds: the prompt, then the warm-up tokens."""
        return self.info.prompt_tokens + self.info.warmup_tokens

    def warmup(self) -> list[int]:
        """The warm-up tokens: the start of every generation from the bundle's own prompt."""
        return [] if self.warmup_ids is None else self.warmup_ids.tolist()

    def own_ids(self) -> torch.Tensor | None:
        """[T + W] the bundle's prompt and warm-up tokens, for a prefill in place of its KV."""
        if self.prompt_ids is None:
            return None
        return torch.cat([self.prompt_ids, torch.tensor(self.warmup(), dtype=torch.long)])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.weights)
        for i, idx in enumerate(self.indices):
            out[INDICES.format(i)] = idx
        if self.kv is not None:
            for i, (k, v) in enumerate(self.kv):
                out[KV_KEY.format(i)] = k
                out[KV_VALUE.format(i)] = v
        if self.prompt_ids is not None:
            out[PROMPT_IDS] = self.prompt_ids
        if self.last_logits is not None:
            out[LAST_LOGITS] = self.last_logits
        if self.warmup_ids is not None:
            out[WARMUP_IDS] = self.warmup_ids
        return {name: t.detach().cpu().contiguous() for name, t in out.items()}


# -- writing -----------------------------------------------------------------------------


def write_bundle(bundle: Bundle, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a bundle as one safetensors file, atomically (a temporary file renamed into place); an
    existing file is refused unless force=True. Returns the path.

        write_bundle(export_prompt(lm, text), "expert.safetensors")
    """
    from safetensors.torch import save_file

    path = check_output_path(path, force)
    try:
        with atomic_output(path) as tmp:
            save_file(bundle.tensors(), str(tmp), metadata=bundle.info.to_metadata())
    except OSError as e:
        raise GriffinError(f"cannot write {path}: {e.strerror or e}") from e
    return path


# -- reading -----------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """(metadata, {tensor name: (dtype, shape)}) from the header alone: no tensor data read."""
    path = Path(path)
    if path.is_dir():
        raise GriffinError(f"bundle {path} is a directory; give a .safetensors file")
    if not path.is_file():
        raise GriffinError(f"bundle {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise GriffinError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > min(size - 8, 100_000_000):
            raise GriffinError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise GriffinError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise GriffinError(f"{path} is not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    entries = {}
    for name, entry in header.items():
        try:
            end = max(end, int(entry["data_offsets"][1]))
            entries[name] = (entry["dtype"], list(entry["shape"]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise GriffinError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if 8 + n + end != size:
        raise GriffinError(
            f"{path} is truncated or corrupt: header promises {8 + n + end} bytes, file has {size}"
        )
    return meta, entries


def read_info(path: str | os.PathLike) -> BundleInfo:
    """A bundle file's metadata from its header alone (no tensor is read), validated.

        read_info("expert.safetensors").base_model
    """
    meta, _ = read_metadata(path)
    return BundleInfo.from_metadata(meta, str(path))


def read_bundle(path: str | os.PathLike, *, load_kv: bool = True, device: str = "cpu") -> Bundle:
    """Read and self-validate a bundle (format, names, shapes, index ranges)."""
    from safetensors import safe_open

    meta, entries = read_metadata(path)
    info = BundleInfo.from_metadata(meta, str(path))
    _check_layout(info, entries, str(path))
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            get = f.get_tensor
            indices = [get(INDICES.format(i)) for i in range(info.num_layers)]
            weight_names = [n for n in entries if not n.startswith("griffin.")]
            weights = {n: get(n) for n in weight_names}
            kv = None
            if info.has_kv and load_kv:
                kv = [(get(KV_KEY.format(i)), get(KV_VALUE.format(i))) for i in range(info.num_layers)]
            prompt_ids = get(PROMPT_IDS) if PROMPT_IDS in entries else None
            last_logits = get(LAST_LOGITS) if LAST_LOGITS in entries else None
            warmup_ids = get(WARMUP_IDS) if WARMUP_IDS in entries else None
    except GriffinError:
        raise
    except Exception as e:
        raise GriffinError(f"{path} is corrupt: {e}") from e
    bundle = Bundle(info, indices, weights, kv, prompt_ids, last_logits, warmup_ids)
    _check_indices(bundle, str(path))
    _check_finite(bundle, str(path))
    return bundle


def _check_finite(bundle: Bundle, source: str) -> None:
    """Every float tensor finite: a NaN in the KV or the weights would decode garbage silently."""
    named = [*bundle.weights.items(), (LAST_LOGITS, bundle.last_logits)]
    for i, pair in enumerate(bundle.kv or []):
        named += [(KV_KEY.format(i), pair[0]), (KV_VALUE.format(i), pair[1])]
    for name, t in named:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise GriffinError(f"{source} is corrupt: tensor {name} holds {bad} non-finite value(s) (NaN or inf)")


def _check_layout(info: BundleInfo, entries: dict[str, tuple[str, list[int]]], source: str) -> None:
    spec = spec_for(info.architecture)
    if len(info.k) != info.num_layers:
        raise GriffinError(f"{source}: metadata k lists {len(info.k)} layers, num_layers is {info.num_layers}")
    problems = []
    for i, k in enumerate(info.k):
        if not 1 <= k <= info.d_ff:
            problems.append(f"layer {i}: k={k} is outside 1..{info.d_ff}")
            continue
        name = INDICES.format(i)
        if name not in entries:
            problems.append(f"tensor {name} is missing")
        elif entries[name][1] != [k]:
            problems.append(f"tensor {name} has shape {entries[name][1]}, expected [{k}]")
        biases = {p: ff_param(spec, i, p, "bias") in entries for p in (*spec.inputs, spec.output)}
        for tname, shape in expected_shapes(spec, i, k, info.hidden_size, biases).items():
            if tname not in entries:
                problems.append(f"tensor {tname} is missing")
            elif tuple(entries[tname][1]) != shape:
                problems.append(f"tensor {tname} has shape {entries[tname][1]}, expected {list(shape)}")
        if info.has_kv:
            for tname in (KV_KEY.format(i), KV_VALUE.format(i)):
                if tname not in entries:
                    problems.append(f"tensor {tname} is missing (metadata says the bundle has a KV cache)")
    if info.has_kv and PROMPT_IDS not in entries:
        problems.append(f"tensor {PROMPT_IDS} is missing")
    if info.warmup_tokens < 0:
        problems.append(f"warmup_tokens={info.warmup_tokens} is negative")
    elif info.warmup_tokens and entries.get(WARMUP_IDS, (None, None))[1] != [info.warmup_tokens]:
        problems.append(f"tensor {WARMUP_IDS} should have shape [{info.warmup_tokens}] (metadata warmup_tokens), "
                        f"found {entries[WARMUP_IDS][1] if WARMUP_IDS in entries else 'none'}")
    elif not info.warmup_tokens and WARMUP_IDS in entries:
        problems.append(f"tensor {WARMUP_IDS} is there but metadata warmup_tokens is 0")
    if info.warmup_tokens and info.kind != "prompt":
        problems.append(f"a {info.kind} bundle cannot have warm-up tokens")
    if info.warmup_tokens and info.format_version == FORMAT_VERSION:
        problems.append(f"format version {FORMAT_VERSION} cannot hold warm-up tokens")
    if WARMUP_IDS in entries and entries[WARMUP_IDS][0] != "I64":
        problems.append(f"tensor {WARMUP_IDS} has dtype {entries[WARMUP_IDS][0]}, expected I64")
    if PROMPT_IDS in entries and info.kind == "prompt" and entries[PROMPT_IDS][1] != [info.prompt_tokens]:
        problems.append(f"tensor {PROMPT_IDS} has shape {entries[PROMPT_IDS][1]}, metadata prompt_tokens is "
                        f"{info.prompt_tokens}")
    if info.has_kv:
        problems += _kv_problems(info, entries)
        cached = info.prompt_tokens + info.warmup_tokens
        # sliding-window layers may hold fewer positions, never more
        longest = max((entries[KV_KEY.format(i)][1][2] for i in range(info.num_layers)
                       if KV_KEY.format(i) in entries and len(entries[KV_KEY.format(i)][1]) == 4), default=cached)
        if longest > cached:
            problems.append(f"the KV cache holds {longest} positions; prompt + warm-up tokens are {cached}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise GriffinError(f"{source}: " + "; ".join(problems[:3]) + more)


def _kv_problems(info: BundleInfo, entries: dict[str, tuple[str, list[int]]]) -> list[str]:
    """Every layer's key and value: [1, kv_heads, positions, head_dim], one layout for all layers
    (the positions may differ: sliding-window layers), the bundle's dtype."""
    problems, layout = [], None
    want = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(info.dtype)
    for i in range(info.num_layers):
        k, v = entries.get(KV_KEY.format(i)), entries.get(KV_VALUE.format(i))
        if k is None or v is None:
            continue  # reported as missing
        for name, (dtype, shape) in ((KV_KEY.format(i), k), (KV_VALUE.format(i), v)):
            if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
                problems.append(f"tensor {name} has shape {shape}, expected [1, kv_heads, positions, head_dim]")
            elif dtype != want:
                problems.append(f"tensor {name} has dtype {dtype}, the bundle is {info.dtype}")
            elif layout is None:
                layout = (shape[1], shape[3])
            elif (shape[1], shape[3]) != layout:
                problems.append(f"tensor {name} has shape {shape}: kv_heads/head_dim differ from layer 0's {list(layout)}")
        if k[1] != v[1]:
            problems.append(f"layer {i}'s KV key {k[1]} and value {v[1]} differ in shape")
    return problems


def kv_layout_of(bundle: Bundle) -> tuple[int, int] | None:
    """(kv_heads, head_dim) of a bundle's KV cache, None without one."""
    if not bundle.kv:
        return None
    k = bundle.kv[0][0]
    return int(k.shape[1]), int(k.shape[3])


def _check_indices(bundle: Bundle, source: str) -> None:
    d = bundle.info.d_ff
    for i, idx in enumerate(bundle.indices):
        if idx.dtype != torch.int64:
            raise GriffinError(f"{source}: {INDICES.format(i)} has dtype {idx.dtype}, expected int64")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
            raise GriffinError(f"{source}: {INDICES.format(i)} has indices outside 0..{d - 1}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise GriffinError(f"{source}: {INDICES.format(i)} is not strictly increasing (duplicated or unsorted indices)")
    w, logits, ids = bundle.warmup_ids, bundle.last_logits, bundle.prompt_ids
    if logits is not None and (logits.dim() != 1 or not logits.is_floating_point()):
        raise GriffinError(f"{source}: {LAST_LOGITS} has shape {list(logits.shape)} and dtype {logits.dtype}, "
                           "expected float [vocab]")
    if ids is not None and (ids.dtype != torch.int64 or ids.dim() != 1 or (ids.numel() and int(ids.min()) < 0)):
        raise GriffinError(f"{source}: {PROMPT_IDS} must be int64 [tokens] of non-negative ids")
    for name, t in ((WARMUP_IDS, w), (PROMPT_IDS, ids)):
        if t is not None and logits is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= logits.numel()):
            raise GriffinError(f"{source}: {name} has token ids outside the vocabulary 0..{logits.numel() - 1}")


def check_compatible(info: BundleInfo, *, architecture: str, fingerprint: str, identity: str,
                     num_layers: int, d_ff: int, hidden_size: int, source: str) -> None:
    """A bundle only decodes with the exact base model it was exported from."""
    if info.architecture != architecture:
        raise GriffinError(
            f"{source} was exported from a {info.architecture} model ({info.base_model}), "
            f"but the base model is {architecture} ({identity})"
        )
    if (info.num_layers, info.d_ff, info.hidden_size) != (num_layers, d_ff, hidden_size):
        raise GriffinError(
            f"{source} has {info.num_layers} layers × d_ff {info.d_ff} × hidden {info.hidden_size}; "
            f"the base model {identity} has {num_layers} × {d_ff} × {hidden_size}"
        )
    if info.base_fingerprint != fingerprint:
        raise GriffinError(
            f"{source} belongs to base model {info.base_model} (fingerprint {info.base_fingerprint[:16]}, "
            f"dtype {info.dtype}), not to {identity} (fingerprint {fingerprint[:16]}); "
            "pass the bundle's base model as model=DIR_OR_GGUF"
        )
