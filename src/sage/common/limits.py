"""Per-request limits that more than one service enforces, defined once.

The scheduler checks an embedding request's size before charging the tenant or shipping it
on; the embedding service checks it again for callers that reach it directly.
"""

from __future__ import annotations

from collections.abc import Iterable

from sage.common.exceptions import InvalidRequestError

# The cap is stated in tokens but measured without a tokenizer: about 4 characters a token.
CHARS_PER_TOKEN = 4


def estimate_request_tokens(texts: Iterable[str]) -> int:
    """Tokens an embedding request carries, at CHARS_PER_TOKEN characters a token."""
    return sum(-(-len(text) // CHARS_PER_TOKEN) for text in texts)


def check_embedding_tokens(texts: Iterable[str], max_tokens: int) -> int:
    """The request's estimated tokens; InvalidRequestError naming the limit when over
    `max_tokens` (0 or less: no limit)."""
    tokens = estimate_request_tokens(texts)
    if 0 < max_tokens < tokens:
        raise InvalidRequestError(
            f"input is about {tokens} tokens ({CHARS_PER_TOKEN} characters a token); an "
            f"embedding request may carry at most {max_tokens} tokens "
            "(SAGE_EMBEDDING_MAX_TOKENS_PER_REQUEST): split it into smaller requests",
            param="input",
            code="embedding_tokens_over_limit",
        )
    return tokens
