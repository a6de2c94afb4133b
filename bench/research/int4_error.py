"""Research probe: how far each int4 algorithm moves the default model's weights, through ONNX Runtime's
own MatMulNBits kernel (one-MatMul graphs, random inputs), block 32, accuracy_level 0 (float compute).

    python -m bench.research.int4_error            # prints the relative error |x W_q - x W| / |x W| per weight

The default model is a Q4_1 GGUF (blocks of 32 with a float minimum), dequantized to float32: rtn's integer
zero point shifts each block by up to half a step; hqq's fitted float zero point can land on the Q4_1 grid.
"""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from griffin_export.model.arch import ff_blocks
from griffin_export.model.load import load_model
from griffin_export.targets.onnx.int4 import _quantize_one
from griffin_export.settings import QuantSettings

lm = load_model(None, quiet=True)
blocks = ff_blocks(lm.model, lm.spec)
for layer in (0, 14, 29):
    for proj, linear in ((lm.spec.inputs[0], blocks[layer].inputs[lm.spec.inputs[0]]), (lm.spec.output, blocks[layer].output)):
        w = linear.weight.detach().t().contiguous().numpy()  # [in, out]
        k, n = w.shape
        x = np.random.default_rng(layer).standard_normal((16, k)).astype(np.float32)
        ref = x @ w
        errs = {}
        for algorithm in ("rtn", "hqq"):
            q = QuantSettings(algorithm=algorithm, accuracy_level=0)
            packed, scales, zp = _quantize_one(w, q)
            inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")]
            inputs = ["x", "w", "s"]
            if zp is not None:
                inits.append(numpy_helper.from_array(zp, "z"))
                inputs.append("z")
            node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
            g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, n])], inits)
            m = helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
            y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            errs[algorithm] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        print(f"layer {layer:2d} {proj:9s} rtn {errs['rtn']:.2e}  hqq {errs['hqq']:.2e}")
