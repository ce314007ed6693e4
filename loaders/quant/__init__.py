"""Reading GPTQ/AWQ checkpoints (formats) and running them on CPU (linear)."""
from loaders.quant.formats import (QuantSpec, default_g_idx, dequantize, read_quant_spec, unpack_awq,
                                   unpack_gptq)

__all__ = ["QuantSpec", "default_g_idx", "dequantize", "read_quant_spec", "unpack_awq", "unpack_gptq"]
