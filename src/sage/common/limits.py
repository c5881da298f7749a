"""Per-request limits that more than one service enforces, defined once.

The scheduler checks an embedding request's size before charging the tenant or shipping it
on; the embedding service checks it again for callers that reach it directly.
"""

from __future__ import annotations

from collections.abc import Iterable

from sage.common.exceptions import InvalidRequestError

# Tokens are estimated without a tokenizer from UTF-8 bytes: English (~4 characters a
# token) is over-counted a little, CJK (3 bytes a character, ~1 token each) comes out right;
# counting characters instead let CJK through at ~4x the cap.
BYTES_PER_TOKEN = 3


def estimate_text_tokens(text: str) -> int:
    """Tokens `text` may take, at BYTES_PER_TOKEN UTF-8 bytes a token (never 0)."""
    return len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN + 1


def estimate_request_tokens(texts: Iterable[str]) -> int:
    """Tokens an embedding request carries (estimate_text_tokens of each input)."""
    return sum(estimate_text_tokens(text) for text in texts)


def check_embedding_tokens(texts: Iterable[str], max_tokens: int) -> int:
    """The request's estimated tokens; InvalidRequestError naming the limit when over
    `max_tokens` (0 or less: no limit)."""
    tokens = estimate_request_tokens(texts)
    if 0 < max_tokens < tokens:
        raise InvalidRequestError(
            f"input is about {tokens} tokens ({BYTES_PER_TOKEN} UTF-8 bytes a token); an "
            f"embedding request may carry at most {max_tokens} tokens "
            "(SAGE_EMBEDDING_MAX_TOKENS_PER_REQUEST): split it into smaller requests",
            param="input",
            code="embedding_tokens_over_limit",
        )
    return tokens
