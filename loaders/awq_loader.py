"""The `awq` loader: AutoAWQ 4-bit checkpoints (GEMM and GEMV layouts, zero points, any group size),
read by Hearth itself:
on a GPU through Hearth's engine (4-bit layers on its tensor-core kernel), on CPU dequantized once (or torch's
int4 kernel)."""
from __future__ import annotations

from loaders.quant.loader import QuantizedModelLoader


class AWQLoader(QuantizedModelLoader):
    name = "awq"
    method = "awq"
    description = ("AWQ checkpoints (quant_config.json or config.json quantization_config); Hearth's engine on a "
                   "GPU, transformers on CPU.")
