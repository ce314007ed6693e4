"""The bottom layer: contracts every other package shares (option declarations, the load error, reading
checkpoint files and their tensor headers, the quantized-weight type and the checkpoint formats that produce it).
It imports nothing from Hearth above it."""
