"""The gRPC service around the engine (API: ../shared/API.md; stubs: loraplex.v1, generated from proto/)."""
