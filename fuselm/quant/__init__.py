"""Weight quantisation: formats (formats.py), GGUF tensors kept as they are (gguf_quants.py), the
modules that compute with them (linear.py) and how a model gets them (apply.py)."""
