"""Putting a model to work: the spec's "Generation Process".

    sampling  SamplingOptions (one object, from the flags or a request's JSON to the sampler)
              and the sampler: repetition penalty, temperature, top-k, top-p, the draw;
              PenaltyState, what the penalties remember of each row
    context   fit_context: does a prompt and its answer fit the context (the one rule)
    decode    the CPU decode plan: the model's weights laid out for one-token steps
    step_kernel  DTL's decode step in C (OpenMP): every block and the head in one call,
              built on first use; the plan's step runs it (else the eager step)
    loop      the one token loop (`TokenLoop`), and `generate_tokens` on token ids
    batch     continuous batching: requests join and leave a running loop, as text
    text      `generate`, `stream`, `stream_batch`: text in, text out
    evaluate  perplexity and bits per byte, SQuAD exact match and F1

>>> from dtl.generate import generate_tokens, generate, stream  # doctest: +SKIP
"""

from dtl.generate.batch import (
    ContinuousBatch,
    RowText,
    StreamChunk,
    encode_prompts,
    fit_request,
    prompt_lengths,
)
from dtl.generate.context import Fit, fit_context
from dtl.generate.loop import Request, TokenLoop, generate_tokens, iter_tokens, last_logits
from dtl.generate.sampling import (
    PenaltyState,
    SamplingOptions,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    context_tokens,
    filter_top_p,
    sample_next,
    seeded_generator,
)
from dtl.generate.text import Completion, generate, stream, stream_batch, stream_requests

__all__ = [
    "Completion",
    "ContinuousBatch",
    "Fit",
    "PenaltyState",
    "Request",
    "RowText",
    "SamplingOptions",
    "StreamChunk",
    "TokenLoop",
    "apply_repetition_penalty",
    "ban_repeated_ngrams",
    "context_tokens",
    "encode_prompts",
    "filter_top_p",
    "fit_context",
    "fit_request",
    "generate",
    "generate_tokens",
    "iter_tokens",
    "last_logits",
    "prompt_lengths",
    "sample_next",
    "seeded_generator",
    "stream",
    "stream_batch",
    "stream_requests",
]
