"""The gRPC adapter: the Inference and Admin servicers over the one request path
(server/inference.py), and the decoder that registers them (wire.py). Imports nothing of
the HTTP adapter."""
