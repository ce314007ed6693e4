"""The `gptq` loader: AutoGPTQ / GPTQ-for-LLaMa checkpoints (2/3/4/8-bit, any group size, act-order,
sym/asym, checkpoint_format gptq and gptq_v2), read by Hearth itself."""
from __future__ import annotations

from loaders.quant.loader import QuantizedModelLoader


class GPTQLoader(QuantizedModelLoader):
    name = "gptq"
    method = "gptq"
    config_file = "quantize_config.json"
