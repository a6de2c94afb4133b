"""ONNX Runtime loader: an exported decoder graph + a bundle's experts and KV cache.

    rt = load_onnx_runtime("expert_onnx/", "expert.safetensors")   # CUDA if a GPU answers, else CPU
    print(rt.provider, rt.generate(DecodeOptions(max_new_tokens=64)).text)

The bundle's FF weights replace the graph's initializers of the same names at session
creation (SessionOptions.add_initializer), so one exported graph serves every bundle of
the same base model and k per layer. The KV cache stays on the provider's device between
steps (IOBinding); only the logits come back to the host. Decoding is the shared loop of
griffin_export.decoding, so equal weights give the PyTorch runtime's tokens.

No PyTorch model is loaded: the graph carries the base model's fingerprint and the
exporter saved the tokenizer beside it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from ..bundle.format import Bundle, read_bundle
from ..errors import GriffinError
from ..model.tokens import check_generation_fits, encode
from ..registry import one_of
from ..settings import KV_DTYPES, PROVIDERS, RuntimeOptions
from ..targets.onnx.graph import PAST, PRESENT, Graph, GraphInfo, check_graph_bundle, read_graph, step_read_bytes
from ..targets.onnx.int4 import quantize_for_swap
from ..targets.onnx.lean import quantize_kv
from .base import Runtime, left_padded
from .timing import BenchContext, BenchRow, greedy_seconds

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# logits elements one batched prefill run of a lean graph may return (it computes every position's):
# 2**26 float32 = 256 MB, e.g. two 512-token prompts of a 49k vocabulary
PREFILL_LOGITS = 1 << 26
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_KV_NP_DTYPES = {**_NP_DTYPES, "int8": np.int8}  # a lean graph's KV buffers (GraphInfo.kv)


# -- provider ------------------------------------------------------------------------------------


def gpu_answers() -> tuple[bool, str]:
    """Whether the CUDA provider really runs here: onnxruntime-gpu lists CUDAExecutionProvider
    even on a machine without a GPU or CUDA libraries, and falls back to CPU silently."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu for GPUs)"
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages, where torch did not load them
        with contextlib.redirect_stdout(StringIO()):  # it prints what it did not find; the probe below decides
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - best effort; a real failure shows in the probe
                pass
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ort.set_default_logger_severity(4)  # the failed CUDA load logs an error we turn into a reason
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA])
        if sess.get_providers()[0] != CUDA:
            return False, "the CUDA provider is installed but did not start (no GPU, or CUDA/cuDNN libraries missing)"
        x = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.float32), "cuda", 0)
        io = sess.io_binding()
        io.bind_ortvalue_input("x", x)
        io.bind_output("y", "cuda", 0)
        sess.run_with_iobinding(io)
    except Exception as e:  # any failure here means: no usable GPU
        return False, f"the CUDA provider failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    finally:
        ort.set_default_logger_severity(3)
    return True, "a GPU answered"


def choose_provider(provider: str = "auto") -> tuple[str, str]:
    """(provider, why): auto = CUDA when installed and a GPU answers, else CPU."""
    one_of(provider, PROVIDERS, "provider")
    if provider == "cpu":
        return CPU, "requested"
    ok, why = gpu_answers()
    if ok:
        return CUDA, why
    if provider == "cuda":
        raise GriffinError(f"CUDA provider requested, but {why}")
    return CPU, why


# -- the runtime -----------------------------------------------------------------------------------


@dataclass
class KVState:
    """The cache between steps: per layer (key, value) OrtValues on the provider's device.
    Traced graphs: each [1, kv_heads, length, head_dim], replaced every step. Lean graphs: the
    fixed buffers [1, kv_heads, max_length, head_dim] the graph writes into in place."""

    past: list  # [key0, value0, key1, value1, ...]
    length: int
    io: tuple | None = None  # lean graphs: (session, its IOBinding with the buffers bound), reused every step


class _Session:
    """A traced graph: past in, a new present out every step."""

    def __init__(self, graph: Graph, provider: str, overrides: dict[str, np.ndarray] | None, threads: int | None,
                 cuda_options: dict[str, str] | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if overrides:
            # add_external_initializers, not add_initializer: ORT's constant folding turns
            # Transpose(W) into a new constant from the file's W *before* add_initializer's value
            # is used, so a swapped bundle would silently decode with the exported one's weights.
            # add_external_initializers replaces the (external-data) tensors before any
            # optimization, and checks name, shape and dtype.
            names = list(overrides)
            values = [ort.OrtValue.ortvalue_from_numpy(overrides[n]) for n in names]
            so.add_external_initializers(names, values)
            self._held = (overrides, values)  # must outlive the session: ORT may use the buffers in place
        providers = [(CUDA, {"device_id": 0, **(cuda_options or {})}), CPU] if provider == CUDA else [CPU]
        try:
            self.sess = ort.InferenceSession(str(graph.path), so, providers=providers)
        except Exception as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GriffinError(f"ONNX Runtime cannot load {graph.path}: {text}") from e
        self.graph = graph
        self.device = ("cuda", 0) if provider == CUDA else ("cpu", 0)
        L = graph.info.num_layers
        self.past_names = [PAST.format(i, t) for i in range(L) for t in ("key", "value")]
        self.present_names = [PRESENT.format(i, t) for i in range(L) for t in ("key", "value")]

    def run(self, ids: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        """ids [1, S] after state.length cached tokens -> (last-position logits [vocab], new state)."""
        s = ids.shape[1]
        logits, present = self.run_batch(ids, np.ones((1, state.length + s), np.int64),
                                         np.arange(state.length, state.length + s, dtype=np.int64)[None], state.past)
        return logits[0], KVState(present, state.length + s)

    def run_batch(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list
                  ) -> tuple[np.ndarray, list]:
        """ids [B, S], attention mask [B, past + S], positions [B, S] -> (last-position logits
        [B, vocab], the present KV OrtValues, left on the provider's device for the next step)."""
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, *self.device)
        self.sess.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy()[:, -1], list(out[1:])

    def empty(self, batch: int = 1) -> KVState:
        import onnxruntime as ort

        info = self.graph.info
        empty = np.zeros((batch, info.kv_heads, 0, info.head_dim), _NP_DTYPES[info.dtype])
        # host memory even under CUDA: nothing to copy, and no zero-byte device allocations
        return KVState([ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * info.num_layers)], 0)

    def select_rows(self, past: list, rows: list[int]) -> list:
        """The batch rows `rows` of every KV tensor (finished sequences leave the batch); under
        CUDA this goes through host memory."""
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows]), *self.device) for v in past]

    def from_arrays(self, arrays: list[np.ndarray], length: int) -> KVState:
        import onnxruntime as ort

        return KVState([ort.OrtValue.ortvalue_from_numpy(a, *self.device) for a in arrays], length)


class _LeanSession(_Session):
    """A lean graph (onnx_lean.py): every layer's past input and present output are bound to one
    buffer of max_length positions, which GroupQueryAttention updates in place; a decode step
    rebinds only input_ids and the attention mask.

    static (what CUDA graph capture needs, and what cuda_graph turns on): the session owns one
    set of buffers for every generation, and a decode step's inputs and logits live at fixed
    addresses with fixed shapes (the mask spans the whole buffer, zeros past the cached tokens),
    updated in place; prefill runs outside the captured graph (gpu_graph_id -1)."""

    GRAPH_ID = "1"  # the decode step's captured CUDA graph

    def __init__(self, graph: Graph, provider: str, overrides: dict[str, np.ndarray] | None, threads: int | None,
                 *, cuda_graph: bool = False, static: bool = False):
        super().__init__(graph, provider, overrides, threads, {"enable_cuda_graph": "1"} if cuda_graph else None)
        info = graph.info
        self.max_length = info.max_length
        self._mask = np.ones((1, info.max_length), np.int64)  # a prefix of it is each step's mask
        self._shape = (1, info.kv_heads, info.max_length, info.head_dim)
        self.static = static or cuda_graph
        self._owned: KVState | None = None
        if self.static:
            import onnxruntime as ort

            if graph.vocab < 1:
                raise GriffinError(f"graph {graph.source} does not fix its logits' vocabulary size; re-export it")
            vocab, dev = graph.vocab, self.device
            self._ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1), np.int64), *dev)
            self._static_mask = np.zeros((1, info.max_length), np.int64)
            self._mask_value = ort.OrtValue.ortvalue_from_numpy(self._static_mask, *dev)
            self._logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, vocab), _NP_DTYPES[info.dtype]), *dev)
            self._decode_opts, self._prefill_opts = ort.RunOptions(), ort.RunOptions()
            if cuda_graph:
                self._decode_opts.add_run_config_entry("gpu_graph_id", self.GRAPH_ID)
                self._prefill_opts.add_run_config_entry("gpu_graph_id", "-1")

    def empty(self) -> KVState:
        return self.from_arrays([], 0)

    def from_arrays(self, arrays: list[np.ndarray], length: int) -> KVState:
        """Buffers holding `arrays` (per layer key, value [1, kv_heads, n, head_dim]) as the
        positions just before `length`, zeros elsewhere (never read: the mask ends at length).
        Static sessions refill their own buffers (a captured graph knows only their addresses)."""
        import onnxruntime as ort

        if length > self.max_length:
            raise GriffinError(f"the cache holds {length} tokens; graph {self.graph.source} has a KV buffer of "
                               f"{self.max_length} positions (export it with a larger `max_length`)")
        dtype = _KV_NP_DTYPES[self.graph.info.kv]
        hosts = []
        for i in range(2 * self.graph.info.num_layers):
            buf = np.zeros(self._shape, dtype)
            if arrays:
                n = arrays[i].shape[2]
                buf[:, :, length - n:length] = arrays[i]
            hosts.append(buf)
        if not self.static:
            return KVState([ort.OrtValue.ortvalue_from_numpy(h, *self.device) for h in hosts], length)
        if self._owned is None:
            self._owned = KVState([ort.OrtValue.ortvalue_from_numpy(h, *self.device) for h in hosts], length)
        else:
            for value, h in zip(self._owned.past, hosts):
                value.update_inplace(h)
            self._owned.length = length
        return self._owned

    def _binding(self, state: KVState):
        """This session's IOBinding of the state's buffers (a full graph's prefill hands them on to
        the experts' graph)."""
        if state.io is None or state.io[0] is not self:
            io = self.sess.io_binding()
            io.bind_output("logits", "cpu")  # first, so get_outputs()[0] is the logits
            for name, out_name, value in zip(self.past_names, self.present_names, state.past):
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(out_name, value)
            state.io = (self, io)
        return state.io[1]

    def batch_buffers(self, batch: int, columns: int) -> KVState:
        """Zeroed buffers [batch, kv_heads, columns, head_dim] for a batch (columns <= max_length:
        GroupQueryAttention takes a buffer shorter than the graph's rotary table)."""
        import onnxruntime as ort

        info = self.graph.info
        shape = (batch, info.kv_heads, min(columns, self.max_length), info.head_dim)
        # one array per buffer: on the CPU an OrtValue wraps the numpy array's memory, not a copy
        return KVState([ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _KV_NP_DTYPES[info.kv]), *self.device)
                        for _ in range(2 * info.num_layers)], 0)

    def join_rows(self, parts: list[list], columns: int) -> list:
        """Buffers of several batches' rows as one batch's, each `columns` long (cut past, or zero-padded to,
        what every row holds and will hold: a row's tokens sit at the start of its buffer row)."""
        import onnxruntime as ort

        def fit(a: np.ndarray) -> np.ndarray:
            if a.shape[2] >= columns:
                return a[:, :, :columns]
            pad = np.zeros((*a.shape[:2], columns - a.shape[2], a.shape[3]), a.dtype)
            return np.concatenate([a, pad], axis=2)

        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.concatenate([fit(p[i].numpy()) for p in parts])),
                                                 *self.device) for i in range(len(parts[0]))]

    def stack_rows(self, parts: list[list]) -> list:
        """Buffers of several row groups (each a list of per-layer OrtValues) as one batch's."""
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.concatenate([p[i].numpy() for p in parts]), *self.device)
                for i in range(len(parts[0]))]

    def run_rows(self, ids: np.ndarray, lengths: np.ndarray, state: KVState) -> np.ndarray:
        """A batch step: ids [B, S] right-padded, `lengths` [B] each row's tokens after this step
        (a row's tokens sit at the start of its buffer row, so GroupQueryAttention's per-row
        seqlens_k, from the mask's sums, place each row's keys and rotary positions by themselves).
        Returns logits [B, S, vocab]; a prompt row's last logits are at its length - 1."""
        io = self._binding(state)
        mask = (np.arange(int(lengths.max()))[None] < lengths[:, None]).astype(np.int64)
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", mask)
        io.bind_output("logits", "cpu")
        self.sess.run_with_iobinding(io, self._prefill_opts if self.static else None)
        return io.get_outputs()[0].numpy()

    def run(self, ids: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        s = ids.shape[1]
        end = state.length + s
        if end > self.max_length:
            raise GriffinError(f"{end} tokens do not fit graph {self.graph.source}'s KV buffer of "
                               f"{self.max_length} positions (export it with a larger `max_length`)")
        io = self._binding(state)
        if self.static and s == 1:  # the decode step: fixed addresses and shapes, values updated in place
            self._ids.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
            self._static_mask[0, :end] = 1
            self._static_mask[0, end:] = 0
            self._mask_value.update_inplace(self._static_mask)
            io.bind_ortvalue_input("input_ids", self._ids)
            io.bind_ortvalue_input("attention_mask", self._mask_value)
            io.bind_ortvalue_output("logits", self._logits)
            self.sess.run_with_iobinding(io, self._decode_opts)
            logits = self._logits.numpy()[0, -1]
        else:
            io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
            io.bind_cpu_input("attention_mask", self._mask[:, :end])
            io.bind_output("logits", "cpu")
            self.sess.run_with_iobinding(io, self._prefill_opts if self.static else None)
            logits = io.get_outputs()[0].numpy()[0, -1]
        state.length = end
        return logits, state


def _layout_text(info: GraphInfo) -> str:
    return f"a lean graph (KV buffer {info.max_length}, {info.kv})" if info.layout == "lean" else "a traced graph"


def _overrides(graph: Graph, bundle: Bundle) -> dict[str, np.ndarray]:
    """The initializers a bundle replaces: its FF weights as they are, or, in a quantized graph,
    quantized as the exporter quantized its own (onnx_quant.quantize_for_swap)."""
    weights = {n: _numpy(t) for n, t in bundle.weights.items()}
    if not graph.packing:
        return weights
    out = quantize_for_swap(graph.packing, weights, graph.info.quant_settings())
    out.update({n: w for n, w in weights.items() if n in graph.initializers})  # float ones (biases)
    return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise GriffinError("the ONNX runtime takes float32 or float16 bundles (numpy has no bfloat16)")
    return t.detach().cpu().contiguous().numpy()


class OnnxRuntime(Runtime):
    """Decodes a bundle with an exported graph. `full` (a graph exported with --full) runs the
    prefill of new prompts, as the PyTorch runtime uses the full model for it; with
    pruned_prefill the bundle's graph prefills them itself (what a pruned checkpoint computes)."""

    def __init__(self, graph: str | os.PathLike | Graph, bundle: Bundle | None = None, *,
                 full: str | os.PathLike | Graph | None = None, provider: str = "auto",
                 threads: int | None = None, source: str = "bundle", pruned_prefill: bool = False,
                 cuda_graph: bool = False, static: bool = False):
        self.graph = graph if isinstance(graph, Graph) else read_graph(graph)
        self.bundle = bundle
        self.pruned_prefill = pruned_prefill
        info = self.graph.info
        if info.dtype not in _NP_DTYPES:
            raise GriffinError(f"graph {self.graph.source} is {info.dtype}; the ONNX runtime runs float32 or float16 graphs")
        if bundle is not None:
            check_graph_bundle(self.graph, bundle.info, source)
            for name, t in bundle.weights.items():
                have = self.graph.param_shape(name)
                if have != list(t.shape):
                    raise GriffinError(f"bundle {source} tensor {name} {list(t.shape)} has no initializer of that shape "
                                       f"in graph {self.graph.source} ({have or 'missing'})")
                if name in self.graph.initializers and name not in self.graph.external:
                    raise GriffinError(f"graph {self.graph.source} stores {name} inline; ONNX Runtime only swaps "
                                       "external-data weights: re-export the graph with this griffin-export")
        self.full = full if isinstance(full, Graph) or full is None else read_graph(full)
        if self.full is not None:
            f = self.full.info
            if f.kind != "full":
                raise GriffinError(f"{self.full.source} is a {f.kind} graph; prefill needs a graph of the full model "
                                   "(griffin-export onnx --full)")
            if (f.base_fingerprint, f.num_layers, f.dtype) != (info.base_fingerprint, info.num_layers, info.dtype):
                raise GriffinError(f"full graph {self.full.source} is from {f.base_model} ({f.dtype}, fingerprint "
                                   f"{f.base_fingerprint[:16]}); graph {self.graph.source} is from {info.base_model} "
                                   f"({info.dtype}, fingerprint {info.base_fingerprint[:16]})")
            if (f.layout, f.max_length, f.kv) != (info.layout, info.max_length, info.kv):
                raise GriffinError(f"full graph {self.full.source} is {_layout_text(f)}; graph {self.graph.source} is "
                                   f"{_layout_text(info)}: export both with the same `graph`, `max_length` and "
                                   "`kv_dtype`")
            if any(not (np.array_equal(a, c) and np.array_equal(b, d))
                   for (a, b), (c, d) in zip(self.full.kv_scales(), self.graph.kv_scales())):
                raise GriffinError(f"full graph {self.full.source} and graph {self.graph.source} scale their int8 KV "
                                   "caches differently (exported from different models?): export both from one model")
        if info.layout == "lean" and info.batch_size != 1:
            raise GriffinError(f"graph {self.graph.source} was built for batch {info.batch_size}; this runtime decodes batch 1")
        self.requested_provider = provider
        self.provider, self.provider_reason = choose_provider(provider)
        overrides = _overrides(self.graph, bundle) if bundle is not None else None
        if (cuda_graph or static) and info.layout != "lean":
            raise GriffinError(f"CUDA graphs need the lean graph's fixed buffers; {self.graph.source} is a traced graph")
        if cuda_graph and self.provider != CUDA:
            raise GriffinError(f"CUDA graphs need the CUDA provider; running on {self.provider} ({self.provider_reason})")
        if info.layout == "lean":
            self._decoder = _LeanSession(self.graph, self.provider, overrides, threads, cuda_graph=cuda_graph,
                                         static=static)
            # the full graph prefills into the decoder's buffers, never captured
            self._prefill = _LeanSession(self.full, self.provider, None, threads) if self.full is not None else None
        else:
            self._decoder = _Session(self.graph, self.provider, overrides, threads)
            self._prefill = _Session(self.full, self.provider, None, threads) if self.full is not None else None
        self.tokenizer = _load_tokenizer(self.graph.path.parent)
        self.eos = set(info.eos_token_ids)

    def describe(self) -> str:
        """The runtime in a line. Why the CUDA provider did not run is said only where a GPU was asked
        for: on a CPU machine, `auto` choosing the CPU is no news."""
        import onnxruntime as ort

        why = f" ({self.provider_reason})" if self.requested_provider != "auto" or self.provider == CUDA else ""
        return f"ONNX Runtime {ort.__version__}, {self.provider}{why}"

    # -- cache ------------------------------------------------------------------------------

    def empty_state(self) -> KVState:
        return self._decoder.empty()

    def state_from_kv(self, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> KVState:
        """A cache holding `length` tokens. Sliding-window layers may hold fewer (their last
        window); they are left-padded with zeros, positions the window mask never reads."""
        info = self.graph.info
        if len(kv) != info.num_layers:
            raise GriffinError(f"the KV cache has {len(kv)} layers; the graph has {info.num_layers}")
        arrays = []
        scales = self.graph.kv_scales()
        for i, pair in enumerate(kv):
            for j, t in enumerate(pair):
                arr = _numpy(t)
                if arr.ndim != 4 or arr.shape[0] != 1 or (arr.shape[1], arr.shape[3]) != (info.kv_heads, info.head_dim):
                    raise GriffinError(f"layer {i}'s KV cache has shape {list(arr.shape)}; the graph takes "
                                       f"[1, {info.kv_heads}, positions, {info.head_dim}]")
                if arr.dtype != _NP_DTYPES[info.dtype]:
                    raise GriffinError(f"layer {i}'s KV cache is {arr.dtype}; the graph is {info.dtype}")
                n = arr.shape[2]
                if n > length or (n < length and i not in info.sliding_layers):
                    raise GriffinError(f"layer {i}'s KV cache holds {n} positions; the prompt has {length}")
                if n < length and info.layout == "traced":
                    pad = np.zeros((*arr.shape[:2], length - n, arr.shape[3]), arr.dtype)
                    arr = np.concatenate([pad, arr], axis=2)
                if scales:  # converted once, here, to the graph's KV type
                    arr = quantize_kv(arr, scales[i][j])
                elif info.kv != info.dtype:
                    arr = arr.astype(_KV_NP_DTYPES[info.kv])
                arrays.append(np.ascontiguousarray(arr))
        return self._decoder.from_arrays(arrays, length)

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, before any prefill, a generation that does not fit the model's context or the
        lean graph's KV buffer."""
        check_generation_fits(prompt_tokens, max_new_tokens, self.graph.info.context_length or None)
        tokens, n = prompt_tokens + max_new_tokens, self.graph.info.max_length
        if n and tokens > n:
            raise GriffinError(f"prompt + `max_new_tokens` is {tokens} tokens; graph {self.graph.source} has a KV "
                               f"buffer of {n} positions (export it with max_length={tokens} or more)")

    # -- decoding ---------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor) -> tuple[KVState, torch.Tensor]:
        """Prefill ids [1, T] with the full graph (the experts' with pruned_prefill): (state, last logits [vocab])."""
        session = self._decoder if self.pruned_prefill else self._prefill
        if session is None:
            raise GriffinError("a new prompt (or a bundle without KV) needs the full model for prefill: export it with "
                               "`griffin-export onnx --full -o DIR` and pass full_graph_dir=DIR, or prefill through the "
                               "experts with pruned_prefill=True")
        ctx = self.graph.info.context_length
        if ctx and ids.shape[1] + 1 > ctx:
            raise GriffinError(f"prompt has {ids.shape[1]} tokens; the model's context is {ctx} (leave room to generate)")
        logits, state = session.run(ids.cpu().numpy(), self._decoder.empty())  # the decoder's buffers
        return state, torch.from_numpy(logits.astype(np.float32))

    def start(self, ids: torch.Tensor | None = None) -> tuple[KVState, torch.Tensor]:
        """(state, first logits): a new prompt's full prefill, else the bundle's own prompt and
        warm-up tokens (from its KV unless pruned_prefill)."""
        b = self.bundle
        if ids is not None:
            return self.prefill(ids)
        if b is None:
            raise GriffinError("no bundle: give a prompt to generate from")
        if b.kv is not None and b.last_logits is not None and not self.pruned_prefill:
            return self.state_from_kv(b.kv, b.cached_tokens), b.last_logits.float()
        if b.prompt_ids is not None:
            return self.prefill(b.own_ids()[None])
        raise GriffinError("this bundle has no prompt (a class bundle): give a prompt to generate from")

    def start_batch(self, batch: list[torch.Tensor], max_new_tokens: int):
        """Prefill prompts ids [1, T_b] together (the full graph, unless pruned_prefill). A traced
        graph: left-padded, masked, positions from each prompt's first token. A lean graph:
        right-padded into batch buffers of the longest prompt + max_new_tokens positions."""
        session = self._decoder if self.pruned_prefill else self._prefill
        if session is None:
            self.prefill(batch[0])  # raises the error that names the fix
        if self.graph.info.layout == "lean":
            return self._start_lean_batch(session, batch, max_new_tokens)
        ids, mask, positions = (t.numpy() for t in left_padded(batch))
        logits, past = session.run_batch(ids, mask, positions, self._decoder.empty(len(batch)).past)
        return _OnnxBatch(past, mask, positions[:, -1] + 1), torch.from_numpy(logits.astype(np.float32))

    def _start_lean_batch(self, session: _LeanSession, batch: list[torch.Tensor], max_new_tokens: int):
        if self._decoder.static:
            raise GriffinError("CUDA graphs capture the batch-1 decode step; generate batches without cuda_graph=True")
        lengths = np.array([int(x.shape[1]) for x in batch], np.int64)
        columns = int(lengths.max()) + max_new_tokens
        # the graph's logits cover every position: bound what one prefill run returns
        vocab = max(self.graph.vocab, 1)
        group = max(1, PREFILL_LOGITS // (int(lengths.max()) * vocab))
        parts, logits = [], []
        for first in range(0, len(batch), group):
            rows = batch[first:first + group]
            n = lengths[first:first + group]
            ids = np.zeros((len(rows), int(n.max())), np.int64)
            for b, x in enumerate(rows):
                ids[b, :n[b]] = x[0].cpu().numpy()
            part = self._decoder.batch_buffers(len(rows), columns)
            logits.append(session.run_rows(ids, n, part)[np.arange(len(rows)), n - 1])
            parts.append(part.past)
        state = KVState(parts[0] if len(parts) == 1 else self._decoder.stack_rows(parts), 0)
        # io stays None: the decoder binds the buffers anew (the prefill may be the full graph's session)
        return _LeanBatch(state, lengths), torch.from_numpy(np.concatenate(logits).astype(np.float32))

    @property
    def joins_batches(self) -> bool:
        return self.graph.info.layout == "lean" and not self._decoder.static

    def join_batch(self, state, new, room: int):
        """A lean graph's batches join: the rows stacked, each keeping its buffer row and length, in buffers
        of the longest row + `room` columns (at most the graph's KV buffer)."""
        if not (self.joins_batches and isinstance(state, _LeanBatch)):
            return super().join_batch(state, new, room)
        lengths = np.concatenate([state.lengths, new.lengths])
        columns = min(int(lengths.max()) + room, self._decoder.max_length)
        return _LeanBatch(KVState(self._decoder.join_rows([state.kv.past, new.kv.past], columns), 0), lengths)

    def step_batch(self, state, tokens: list[int], keep: list[int]) -> torch.Tensor:
        if isinstance(state, _LeanBatch):
            if len(keep) < len(state.lengths):  # finished sequences leave the batch
                state.kv = KVState(self._decoder.select_rows(state.kv.past, keep), state.kv.length)
                state.lengths = state.lengths[keep]
            state.lengths = state.lengths + 1
            logits = self._decoder.run_rows(np.array(tokens, np.int64)[:, None], state.lengths, state.kv)
            return torch.from_numpy(logits[:, -1].astype(np.float32))
        if len(keep) < state.mask.shape[0]:  # finished sequences leave the batch
            state.past = self._decoder.select_rows(state.past, keep)
            state.mask, state.next_pos = state.mask[keep], state.next_pos[keep]
        state.mask = np.concatenate([state.mask, np.ones((len(keep), 1), np.int64)], axis=1)
        logits, state.past = self._decoder.run_batch(np.array(tokens, np.int64)[:, None], state.mask,
                                                     state.next_pos[:, None], state.past)
        state.next_pos = state.next_pos + 1
        return torch.from_numpy(logits.astype(np.float32))

    def step(self, state: KVState, token: int) -> torch.Tensor:
        """Feed one token; logits [vocab] for the next. Updates `state` in place."""
        logits, new = self._decoder.run(np.array([[token]], np.int64), state)
        state.past, state.length = new.past, new.length
        return torch.from_numpy(logits.astype(np.float32))

    def tokenize(self, text: str) -> torch.Tensor:
        chat = self.bundle.info.chat if self.bundle is not None else False
        return encode(self.tokenizer, text, context=self.graph.info.context_length or None, chat=chat,
                      model=self.graph.source)


@dataclass
class _LeanBatch:
    kv: KVState  # the batch buffers [B, kv_heads, columns, head_dim] (and their binding)
    lengths: np.ndarray  # [B]: tokens each row holds, from the start of its buffer row


@dataclass
class _OnnxBatch:
    past: list  # per layer key, value OrtValues [B, kv_heads, tokens so far, head_dim]
    mask: np.ndarray  # [B, tokens so far]: 0 at the left padding
    next_pos: np.ndarray  # [B]


def _load_tokenizer(directory: Path):
    if not (directory / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from ..model.load import quiet_transformers

    quiet_transformers(True)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise GriffinError(f"cannot load the tokenizer saved in {directory}: {e}") from e


def load_onnx_runtime(graph: str | os.PathLike, bundle: str | os.PathLike | Bundle | None = None, *,
                      full: str | os.PathLike | None = None, provider: str = "auto", new_prompts: bool = False,
                      pruned_prefill: bool = False, threads: int | None = None, cuda_graph: bool = False,
                      source: str | None = None) -> OnnxRuntime:
    """Graph directory + bundle -> OnnxRuntime. The bundle's KV cache is not read when a new
    prompt (or pruned_prefill) will replace it."""
    source = source or ("bundle" if bundle is None or isinstance(bundle, Bundle) else str(bundle))
    if bundle is not None and not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle, load_kv=not (new_prompts or pruned_prefill))
    return OnnxRuntime(graph, bundle, full=full, provider=provider, threads=threads, source=source,
                       pruned_prefill=pruned_prefill, cuda_graph=cuda_graph)


def load(bundle: Bundle, options: RuntimeOptions, *, new_prompts: bool = False, max_new_tokens: int | None = None,
         source: str = "bundle", quiet: bool = True) -> OnnxRuntime:
    """The registry's loader (runtime/opening.open_runtime). A new prompt needs a prefill, by the full
    model's graph or through the experts: refused before any session is made (seconds) without one."""
    if (new_prompts or not bundle.info.has_kv) and options.full_graph_dir is None and not options.pruned_prefill:
        raise GriffinError("a new prompt (or a bundle without KV) needs the full model for its prefill: export it with "
                           "`griffin-export onnx --full -o DIR` and pass full_graph_dir=DIR, or prefill through the experts "
                           "with pruned_prefill=True")
    if options.kv_dtype is not None:  # the graph's type is fixed at export: a different one is refused, not ignored
        have = read_graph(options.graph_dir).info.kv
        if have != options.kv_dtype:
            raise GriffinError(f"graph {options.graph_dir} keeps its KV cache in {have}; kv_dtype={options.kv_dtype!r} "
                               "needs a graph exported with that KV type")
    rt = load_onnx_runtime(options.graph_dir, bundle, full=options.full_graph_dir, provider=options.provider,
                           new_prompts=new_prompts, pruned_prefill=options.pruned_prefill, threads=options.threads,
                           source=source)
    if not new_prompts and max_new_tokens is not None:
        rt.check_room(bundle.info.prompt_tokens, max_new_tokens)
    if not quiet:
        print(rt.describe(), file=sys.stderr)
    return rt


# -- the speed benchmark's rows (runtime/timing.py) ----------------------------------------------


def bench_graph(ctx: BenchContext, bundle: Bundle | None, layout: str, int4: bool, kv_dtype: str | None = None) -> Path:
    """The graph a row runs (the full model's where bundle is None), exported once per benchmark:
    onnxruntime-genai's rows run the same lean graphs as onnx-lean's. A lean graph's KV buffers hold
    what the benchmark decodes (ctx.room positions): a step reads only the filled part of a buffer
    whatever its length, and a benchmark holds many."""
    from ..targets.onnx.export import export_onnx

    def make() -> Path:
        directory = Path(tempfile.mkdtemp(dir=ctx.tmp, prefix=f"{layout}{'-int4' if int4 else ''}-"))
        export_onnx(ctx.lm, directory, bundle, graph=layout, quantize=ctx.settings.quantize if int4 else None,
                    kv_dtype=kv_dtype, max_length=min(ctx.room, ctx.lm.context_length or ctx.room) if layout == "lean" else None)
        return directory

    return ctx.once(("onnx-graph", layout, int4, kv_dtype, id(bundle)), make)


def graph_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.startswith("model.onnx"))


BENCH_KV_DTYPES = {"onnx-lean": KV_DTYPES, "onnx-lean-int4": KV_DTYPES}  # runtime/timing.py


def bench_rows(ctx: BenchContext, variant: str, bundle: Bundle | None, kv_dtype: str | None = None
               ) -> dict[str, BenchRow]:
    """onnx / onnx-lean: the traced / lean graph; -int4: the same with 4-bit MatMuls; the lean graphs'
    KV buffers of kv_dtype (None: settings.KV_DTYPE). On a GPU the lean graph's decode step is a
    captured CUDA graph (its buffers are fixed); the full model's graph prefills through its own
    session (pruned_prefill: no second session)."""
    import onnxruntime

    from ..targets.onnx.int4 import describe

    s = ctx.settings
    layout, int4 = ("lean" if "lean" in variant else "traced"), variant.endswith("-int4")
    directory = bench_graph(ctx, bundle, layout, int4, kv_dtype)
    rt = OnnxRuntime(directory, None, provider=s.onnx_provider, threads=s.threads,
                     cuda_graph=layout == "lean" and s.onnx_provider == "cuda", pruned_prefill=bundle is None)

    def seconds(n: int) -> float:  # from a fresh copy of the prompt's KV
        state = rt.state_from_kv(ctx.kv, ctx.prompt_len)
        return greedy_seconds(lambda t: rt.step(state, t), ctx.first, n)

    prefill = (lambda: rt.prefill(ctx.ids)) if bundle is None else None
    info = {"onnxruntime": onnxruntime.__version__, "onnx_provider": rt.provider}
    if int4:
        info["int4"] = describe(s.quantize)
    return {"": BenchRow(seconds, graph_bytes(directory), prefill, info=info, weight_bytes=step_read_bytes(rt.graph.path),
                         kv=rt.graph.info.kv)}
