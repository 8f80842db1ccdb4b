"""Per-GPU engine: request state, paged KV cache, continuous batching, model runner."""

from token_scheduler.engine import EngineConfig, LLMEngine
from token_scheduler.llm import LLM
from token_scheduler.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
