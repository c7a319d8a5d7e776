"""The export's choices, importable without TensorFlow (the command's --help needs them)."""

# Platforms a SavedModel can be lowered for (--platforms).
PLATFORMS = ('cpu', 'cuda', 'tpu')

# --dequantize: 'once' keeps float32 copies filled by the first call (fast, the
# float32 memory too); 'every_call' dequantises inside every call (least memory).
DEQUANTIZE = ('once', 'every_call')
