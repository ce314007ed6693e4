"""The `awq` loader: AutoAWQ 4-bit checkpoints (GEMM and GEMV layouts, zero points, any group size), read by
Hearth itself."""
from __future__ import annotations

from loaders.quant.loader import QuantizedModelLoader


class AWQLoader(QuantizedModelLoader):
    name = "awq"
    method = "awq"
    config_file = "quant_config.json"
