"""Embedding service: batches EMBEDDING requests into `/v1/embeddings` calls to engines."""
