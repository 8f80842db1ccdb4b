"""Per-GPU engine: request state, paged KV cache, continuous batching, model runner."""

from token_scheduler.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # The engine imports torch: loaded when first asked for, so the types the controller puts on the wire
    # (request.SamplingParams, policies.slo.ModelSLO) come without it.
    if name in ("EngineConfig", "LLMEngine"):
        from token_scheduler import engine

        return getattr(engine, name)
    if name == "LLM":
        from token_scheduler.llm import LLM

        return LLM
    raise AttributeError(f"module 'token_scheduler' has no attribute {name!r}")
