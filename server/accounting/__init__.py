"""Accounting: API keys (auth), the ledger's vocabulary and its stores (Redis, SQLite),
the spool for when a store is away, quotas and prices. Knows no protocol: nothing here
imports grpc's servers, FastAPI or the adapters."""
