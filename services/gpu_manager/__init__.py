"""GPU manager service: NVML readings and the logical GPU memory reservation ledger.

`GPUResourceManager` is the domain object (SAGE's name); `server.py` serves it over gRPC.
"""

from .resource_manager import GPUResourceManager

__all__ = ["GPUResourceManager"]
