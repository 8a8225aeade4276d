"""fuselm: a prefill-first LLM inference and serving engine.

`LLM` is imported on first use, so importing a lower layer (fuselm.runner, fuselm.core, ...)
does not load the engine above it.
"""

from fuselm.config import EngineConfig
from fuselm.outputs import CompletionOutput, Logprob, RequestOutput
from fuselm.sampling_params import SamplingParams
from fuselm.structured_outputs import StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "RequestOutput", "CompletionOutput",
           "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from fuselm.llm import LLM

        return LLM
    raise AttributeError(f"module 'fuselm' has no attribute {name!r}")
