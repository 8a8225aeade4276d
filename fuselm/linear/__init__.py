"""Linear methods: one object per weight format deciding how a projection is stored and multiplied."""

from fuselm.linear.method import LinearMethod, TorchLinear

__all__ = ["LinearMethod", "TorchLinear"]
