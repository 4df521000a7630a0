"""Model serving: the model manager (one engine per loaded version), the KV budget they
share, the registry watcher and the hot-loader that swaps versions in without dropping a
request."""
