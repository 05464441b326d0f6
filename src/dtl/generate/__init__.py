"""Putting a model to work: the spec's "Generation Process".

    sampling  SamplingOptions and the sampler: repetition penalty, temperature, top-k, top-p
    decode    the CPU decode plan: the model's weights laid out for one-token steps
    loop      the token loop: `generate_tokens`, and the text level `generate` / `stream`
    batch     continuous batching: the server's rows join and leave a running loop
    evaluate  perplexity and bits per byte, SQuAD exact match and F1

>>> from dtl.generate import generate_tokens, generate, stream  # doctest: +SKIP
"""

from dtl.generate.loop import (
    Completion,
    Request,
    RowText,
    SamplingOptions,
    StreamChunk,
    apply_repetition_penalty,
    context_tokens,
    encode_prompts,
    filter_top_k,
    filter_top_p,
    fit_context,
    generate,
    generate_tokens,
    iter_tokens,
    last_logits,
    prompt_lengths,
    sample_next,
    seeded_generator,
    stream,
    stream_batch,
    stream_requests,
)

__all__ = [
    "Completion", "Request", "RowText", "SamplingOptions", "StreamChunk",
    "apply_repetition_penalty", "context_tokens", "encode_prompts", "filter_top_k",
    "filter_top_p", "fit_context", "generate", "generate_tokens", "iter_tokens", "last_logits",
    "prompt_lengths", "sample_next", "seeded_generator", "stream", "stream_batch",
    "stream_requests",
]
