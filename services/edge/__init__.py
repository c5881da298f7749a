"""Edge: the only public HTTP surface; OpenAI API in, gRPC to the scheduler out."""
