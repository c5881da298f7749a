"""Continuing a streamed reply on another scheduler replica when the one serving it dies.

The scheduler already continues a stream whose engine dies on another engine, from what the
client was sent (services/scheduler/resume.py); this is the same rule one hop out, for a
stream whose scheduler dies. The edge holds only what the client was sent, so it continues
from the text, by the rules both share (sage.protocol.continuation): chat sends it back as a
final assistant message with vLLM's `continue_final_message`, completions append it to the
prompt; token limits shrink by the tokens already sent, and the continuation's chunks are
rewritten into the first stream's, so the client reads one stream.

Continued are the replies the scheduler continues: one choice, no echo, plain text (no
tools, structured output or reasoning). The Responses and Messages event streams are not.
"""

from __future__ import annotations

from typing import Any

import orjson

from sage.protocol.continuation import TextContinuation, continuable


class StreamContinuation(TextContinuation):
    """What the client was sent of one streamed single-choice reply, and the request that
    asks another replica for the rest."""

    @classmethod
    def for_request(cls, chat: bool, body: bytes) -> StreamContinuation | None:
        """A tracker for this request; None when its reply cannot be continued."""
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return cls(chat, doc) if continuable(chat, doc) else None

    def continuation(self) -> bytes:
        """The request body asking for the rest of the reply."""
        return self.text_continuation()
