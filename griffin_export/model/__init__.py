"""The base model: loading (HF directory, GGUF, the default model), the adapter table of where each
architecture keeps its FF weights, the full-model forward and KV cache, tokens, and the one decoding loop."""
