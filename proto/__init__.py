"""sol's public gRPC API."""
