"""The serving engine: requests in, token events out. Knows nothing of gRPC or Redis."""
