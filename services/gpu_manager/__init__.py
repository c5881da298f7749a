"""GPU manager service: NVML readings and the logical GPU memory reservation ledger."""
