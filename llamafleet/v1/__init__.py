"""Generated gRPC stubs of the llamafleet.v1 contracts (see protos/; regenerate with `make protos`)."""
