"""The blocks models are composed of: linear methods, rotary embeddings, RMSNorm, paged self-attention,
the gated MLP. A model family (fuselm/models/<family>.py) composes them and names its weights."""
