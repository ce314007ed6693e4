"""The `awq` loader: AutoAWQ 4-bit checkpoints (GEMM and GEMV layouts, zero points, any group size),
read by Hearth itself and run on CPU."""
from __future__ import annotations

from loaders.quant.loader import QuantizedModelLoader


class AWQLoader(QuantizedModelLoader):
    name = "awq"
    method = "awq"
    description = "AWQ checkpoints (quant_config.json or config.json quantization_config), on CPU."
