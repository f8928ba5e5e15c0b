"""OpenAI-compatible HTTP API beside the gRPC server, on the same engine (contract: ../shared/API.md)."""
