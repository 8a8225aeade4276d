"""Speculative decoding: proposers (prompt lookup, draft model), lossless verification, adaptive k."""
