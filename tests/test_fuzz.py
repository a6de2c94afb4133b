"""Fuzzing the readers: several hundred seeded mutations of a real bundle and of an exported
graph directory (tiny Llama). Each must be refused with one GriffinError line or decode; nothing
may crash with another exception, hang (an alarm per case) or run code (an embedded pickle whose
unpickling would write a file)."""

from __future__ import annotations

import copy
import json
import pickle
import random
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch

from griffin_export import DecodeOptions, ExportSettings, TorchRuntime, export_ids, write_bundle
from griffin_export.bundle.format import read_bundle
from griffin_export.errors import GriffinError
from griffin_export.model.load import LoadedModel
from griffin_export.targets.onnx.export import DATA_FILE, MODEL_FILE, export_onnx
from griffin_export.runtime.onnx import OnnxRuntime
from tests.helpers import VOCAB, prompt_ids, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")
SEED = 20261201
OPTS = DecodeOptions(max_new_tokens=3, stop_at_eos=False)


@contextmanager
def deadline(seconds: int):
    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    lm = tiny_model("llama", lean=True)
    bundle = export_ids(lm, prompt_ids(), ExportSettings(density=0.5, warmup=2))
    path = write_bundle(bundle, root / "b.safetensors")
    graph = export_onnx(lm, root / "graph", bundle, max_length=48)
    return lm, path, graph


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def safetensors_mutations(raw: bytes, rng: random.Random, tensors: int = 40) -> list[tuple[str, bytes]]:
    """Any of the house's safetensors files: truncations, flipped header and data bytes, junk metadata
    values, and tensor entries whose dtype, shape or offsets lie."""
    header, data = split(raw)
    hlen = 8 + struct.unpack("<Q", raw[:8])[0]
    out: list[tuple[str, bytes]] = []
    for n in sorted({0, 1, 7, 8, 9, hlen - 1, hlen, hlen + 1, len(raw) - 1} | {rng.randrange(len(raw)) for _ in range(30)}):
        out.append((f"truncated to {n} bytes", raw[:n]))
    for _ in range(60):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(hlen)] = rng.randrange(256)
        out.append(("header bytes flipped", bytes(b)))
    for _ in range(30):
        b = bytearray(raw)
        b[rng.randrange(hlen, len(raw))] = rng.randrange(256)
        out.append(("data byte flipped", bytes(b)))
    junk = ["", "-1", "0", "abc", "1e9", "nan", "99999999999999999999", "true", "3", "griffin-onnx", "float16"]
    meta = header["__metadata__"]
    for key in meta:
        for value in rng.sample(junk, 4):
            h = copy.deepcopy(header)
            h["__metadata__"][key] = value
            out.append((f"metadata {key}={value!r}", join(h, data)))
    names = [n for n in header if n != "__metadata__"]
    for name in rng.sample(names, min(tensors, len(names))):
        entry = header[name]
        edits = [("dtype", "F16"), ("dtype", "I64"), ("dtype", "BOOL"), ("dtype", "XX"),
                 ("shape", entry["shape"][::-1]), ("shape", [*entry["shape"][:-1], entry["shape"][-1] + 1] if entry["shape"] else [1]),
                 ("shape", []), ("shape", [-1]),
                 ("data_offsets", [entry["data_offsets"][1], entry["data_offsets"][0]]),
                 ("data_offsets", [0, len(data) + 64])]
        for field, value in rng.sample(edits, 3):
            h = copy.deepcopy(header)
            h[name][field] = value
            out.append((f"{name} {field}={value}", join(h, data)))
    return out


def bundle_mutations(raw: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    header, data = split(raw)
    out = safetensors_mutations(raw, rng)

    # index values and non-finite values, written into the data
    def rewrite(name: str, values: np.ndarray, label: str) -> None:
        start, end = header[name]["data_offsets"]
        d = bytearray(data)
        d[start:end] = values.tobytes()
        out.append((label, join(header, bytes(d))))

    idx_name = "griffin.indices.0"
    k = header[idx_name]["shape"][0]
    base = np.arange(k, dtype=np.int64)
    for label, values in (("index out of range", np.where(base == k - 1, 10_000, base)),
                          ("negative index", np.where(base == 0, -1, base)),
                          ("duplicate index", np.where(base == 1, 0, base)),
                          ("unsorted indices", base[::-1].copy())):
        rewrite(idx_name, values.astype(np.int64), label)
    for name in ("griffin.kv.0.key", "griffin.last_logits", "model.layers.1.mlp.down_proj.weight"):
        n = int(np.prod(header[name]["shape"]))
        for bad in (np.nan, np.inf):
            values = np.zeros(n, np.float32)
            values[rng.randrange(n)] = bad
            rewrite(name, values, f"{name} holds {bad}")
    return out


class Payload:
    """Unpickling this writes a file: the reader must never get that far."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def refused_or(cases: list[tuple[str, bytes]], target: Path, use: Callable[[str, Path], None], used: str
               ) -> dict[str, int]:
    """Each mutated file written to `target`, then read and used: refused in one line (a GriffinError), or
    `use` succeeds; any other exception, or a hang past 20 s, fails the test. Returns the counts of each."""
    outcome = {"refused": 0, used: 0}
    for label, raw in cases:
        target.write_bytes(raw)
        with deadline(20):
            try:
                use(label, target)
                outcome[used] += 1
            except GriffinError as e:
                assert "\n" not in str(e), (label, str(e))
                outcome["refused"] += 1
            except Exception as e:  # noqa: BLE001 - the failure this test is for
                pytest.fail(f"{label}: {type(e).__name__}: {e}")
    return outcome


def test_mutated_bundles_are_refused_or_decode(real, tmp_path):
    lm, path, _ = real
    rng = random.Random(SEED)
    cases = bundle_mutations(path.read_bytes(), rng)
    marker = tmp_path / "pickle-ran"
    cases.append(("a pickle", pickle.dumps(Payload(marker))))
    cases.append(("torch.save", _torch_save(tmp_path, Payload(marker))))
    cases.append(("pickle after a valid header", path.read_bytes()[:100] + pickle.dumps(Payload(marker))))
    assert len(cases) >= 250

    def decode(label: str, target: Path) -> None:
        bundle = read_bundle(target)
        model = LoadedModel(copy.deepcopy(lm.model), None, lm.identity, lm.spec, lm.fingerprint)
        tokens = TorchRuntime(model, bundle, lean=False).generate(OPTS).token_ids
        assert tokens and all(0 <= t < VOCAB for t in tokens), label

    outcome = refused_or(cases, tmp_path / "m.safetensors", decode, "decoded")
    assert not marker.exists()
    assert outcome["refused"] > 150 and outcome["decoded"] > 10, outcome


def _torch_save(tmp_path: Path, obj) -> bytes:
    f = tmp_path / "obj.pt"
    torch.save(obj, f)
    return f.read_bytes()


def graph_mutations(graph: Path, rng: random.Random) -> list[tuple[str, callable]]:
    """(label, fn(directory)) mutating a copy of the graph directory in place."""
    def truncate(name: str, n: int):
        return lambda d: (d / name).write_bytes((d / name).read_bytes()[:n])

    def flip(name: str, count: int):
        def fn(d):
            b = bytearray((d / name).read_bytes())
            for _ in range(count):
                b[rng.randrange(len(b))] = rng.randrange(256)
            (d / name).write_bytes(bytes(b))
        return fn

    def meta(key: str, value: str):
        def fn(d):
            proto = onnx.load(str(d / MODEL_FILE), load_external_data=False)
            for p in proto.metadata_props:
                if p.key == key:
                    p.value = value
            onnx.save(proto, str(d / MODEL_FILE))
        return fn

    size = (graph / MODEL_FILE).stat().st_size
    data = (graph / DATA_FILE).stat().st_size
    out = [(f"model.onnx truncated to {n}", truncate(MODEL_FILE, n)) for n in (0, 10, size // 2, size - 1)]
    out += [(f"model.onnx.data truncated to {n}", truncate(DATA_FILE, n)) for n in (0, data // 2, data - 1)]
    out += [("model.onnx.data missing", lambda d: (d / DATA_FILE).unlink())]
    out += [("model.onnx bytes flipped", flip(MODEL_FILE, rng.randint(1, 4))) for _ in range(25)]
    out += [("model.onnx.data bytes flipped", flip(DATA_FILE, 3)) for _ in range(5)]
    for key, values in {"k": ["16", "1,2", "abc", ""], "num_layers": ["3", "0", "x"], "layout": ["traced", "x"],
                        "max_length": ["10", "1000", "-1"], "format_version": ["1", "9"], "dtype": ["float16", "int8"],
                        "architecture": ["gemma", "nope"], "kv_heads": ["1", "4"], "head_dim": ["8"],
                        "batch_size": ["2", "0"], "base_fingerprint": ["other"], "format": ["x"]}.items():
        out += [(f"metadata {key}={v!r}", meta(key, v)) for v in values]
    return out


def test_mutated_graph_directories_are_refused_or_decode(real, tmp_path):
    _, path, graph = real
    bundle = read_bundle(path)
    rng = random.Random(SEED)
    cases = graph_mutations(graph, rng)
    assert len(cases) >= 60
    outcome = {"refused": 0, "decoded": 0}
    for i, (label, mutate) in enumerate(cases):
        d = tmp_path / f"g{i}"
        shutil.copytree(graph, d)
        mutate(d)
        with deadline(30):
            try:
                tokens = OnnxRuntime(d, bundle, provider="cpu").generate(OPTS).token_ids
                assert tokens and all(0 <= t < VOCAB for t in tokens), label
                outcome["decoded"] += 1
            except GriffinError as e:
                assert "\n" not in str(e), (label, str(e))
                outcome["refused"] += 1
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{label}: {type(e).__name__}: {e}")
        shutil.rmtree(d)
    assert outcome["refused"] > 30, outcome


@pytest.fixture(scope="module")
def router(real, tmp_path_factory):
    """A router over two class bundles of the tiny model (the bundle and one of another prompt)."""
    from griffin_export.classes.router import Router, RouterInfo, bundle_digest, first_layers, unit_layers, write_router

    lm, path, _ = real
    root = tmp_path_factory.mktemp("router")
    other = write_bundle(export_ids(lm, prompt_ids(seed=3), ExportSettings(density=0.5)), root / "b2.safetensors")
    shutil.copy(path, root / "b1.safetensors")
    names = ["b1.safetensors", "b2.safetensors"]
    centroids = torch.stack([unit_layers(first_layers(lm, prompt_ids(seed=s), 2)) for s in (0, 3)])
    info = RouterInfo(lm.identity, lm.fingerprint, lm.architecture, lm.num_layers, lm.d_ff, 2, ["one", "two"], names,
                      [bundle_digest(root / n) for n in names], [0.5, 0.5])
    assert other.exists()
    return write_router(Router(info, centroids), root / "router.safetensors")


def test_mutated_routers_are_refused_or_route(real, router, tmp_path):
    """A damaged router file: refused in one line, or it routes a prompt to one of its classes."""
    from griffin_export.classes.router import check_router, read_router, route

    lm = real[0]
    rng = random.Random(SEED + 1)
    marker = tmp_path / "pickle-ran"
    cases = safetensors_mutations(router.read_bytes(), rng)
    cases += [("a pickle", pickle.dumps(Payload(marker))), ("torch.save", _torch_save(tmp_path, Payload(marker)))]
    assert len(cases) >= 150

    def routes(label: str, target: Path) -> None:
        r = read_router(target)
        check_router(r, lm)
        chosen = route(lm, r, prompt_ids())
        assert chosen.name in r.info.classes and -1.001 <= chosen.similarity <= 1.001, label

    # beside the bundles, as a router lives
    outcome = refused_or(cases, router.parent / "m.safetensors", routes, "routed")
    assert not marker.exists()
    assert outcome["refused"] > 100 and outcome["routed"] > 5, outcome
