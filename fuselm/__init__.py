"""fuselm: a prefill-first LLM inference and serving engine."""

from fuselm.config import EngineConfig
from fuselm.llm import LLM
from fuselm.outputs import CompletionOutput, Logprob, RequestOutput
from fuselm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
