"""Generated gRPC stubs of the part of SeaweedFS's filer API that storage uses (see
protos/llamafleet/seaweedfs/filer.proto; regenerate with `make protos`)."""
