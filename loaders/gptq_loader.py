"""The `gptq` loader: AutoGPTQ / GPTQ-for-LLaMa checkpoints (2/3/4/8-bit, any group size, act-order,
sym/asym, checkpoint_format gptq and gptq_v2), read by Hearth itself:
on a GPU through Hearth's engine (4-bit layers on its tensor-core kernel), on CPU dequantized once (or torch's
int4 kernel)."""
from __future__ import annotations

from loaders.quant.loader import QuantizedModelLoader


class GPTQLoader(QuantizedModelLoader):
    name = "gptq"
    method = "gptq"
    description = ("GPTQ checkpoints (quantize_config.json or config.json quantization_config); Hearth's engine on a "
                   "GPU, transformers on CPU.")
