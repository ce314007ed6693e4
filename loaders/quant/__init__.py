"""Reading GPTQ/AWQ checkpoints (formats) and running them on CPU through transformers (build)."""
from core.quant_formats import (QuantSpec, default_g_idx, read_quant_spec, read_quant_weight, unpack_awq,
                                   unpack_gptq)

__all__ = ["QuantSpec", "default_g_idx", "read_quant_spec", "read_quant_weight", "unpack_awq", "unpack_gptq"]
