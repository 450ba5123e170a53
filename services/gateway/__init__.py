"""The public ingress: streams generations from the scheduler to any gRPC client."""
