"""ONNX Runtime's own quantisers applied to an exported graph, one precision per call."""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8", "int8-nbits", "int4")
NBITS = {"int8-nbits": 8, "int4": 4}
"""Block-wise weight-only precisions (``MatMulNBits`` at accuracy level 4) and their bits. Their
weight products are batch-invariant (a row's result does not depend on the other rows of the
batch), which dynamic int8 is not: its activation scale spans every row."""


def quantize_graph(src: Path, dst: Path, precision: str, block_size: int = 32, symmetric: bool = True) -> Path:
    """Write ``src`` at ``precision`` to ``dst``.

    - fp16: float16 weights and compute, inputs/outputs kept fp32 (ORT's float16 converter);
    - int8: dynamic quantisation, per-channel int8 weights (``quantize_dynamic``);
    - int8-nbits, int4: block-wise 8- or 4-bit MatMul weights (``MatMulNBits``, accuracy level
      4), ``block_size`` and symmetry configurable.
    """
    import onnx

    if precision not in PRECISIONS:  # the target checked the flags; this is a caller's bug
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    src, dst = Path(src), Path(dst)
    if precision == "fp32":
        save_model(onnx.load(str(src)), dst)  # pulls any external data in next to dst
        return dst
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        save_model(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), dst)
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=NBITS[precision], block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=4)
        q.process()
        save_model(q.model.model, dst)
    return dst


def save_model(model, dst: Path, external: bool = False) -> Path:
    """Save a graph as one file, or with a ``.data`` file beside it past protobuf's 2 GB limit
    (or when ``external``: ONNX Runtime maps external data into memory, so a lookup table such
    as the token embedding only becomes resident for the rows a prompt touches)."""
    import onnx

    big = external or model.ByteSize() > 1_800_000_000
    onnx.save(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
              location=f"{Path(dst).name}.data" if big else None)
    return Path(dst)
