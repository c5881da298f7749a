"""sage.common: the foundation layer (config, ports, errors, logging, types, gRPC runtime)."""
