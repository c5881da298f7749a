"""An engine someone else runs: its base_url is registered as it is; nothing is launched."""

from __future__ import annotations

from sage.common.exceptions import InternalError

from ..spec import EngineSpec
from .base import Availability, LaunchPlan


class ExternalBackend:
    """Any OpenAI-compatible endpoint (chat or embeddings) reached at spec.base_url."""

    name = "external"
    kinds = frozenset({"llm", "embedding"})
    uses_gpu = False
    launches_process = False
    api_key_env = ""  # not ours to start, so not ours to key
    shards = True  # whatever the remote side does is its own business

    def availability(self) -> Availability:
        """Always: there is nothing to install."""
        return Availability(True)

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """Never called: lifecycle registers spec.base_url instead of starting a process."""
        raise InternalError(
            f"backend external launches nothing; register {spec.base_url or 'its base_url'}"
        )
