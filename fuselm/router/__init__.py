"""The router: one OpenAI-compatible endpoint over many fuselm instances (replicas, or prefill and decode)."""
