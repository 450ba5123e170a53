"""SHA-256 content-addressed artifacts on SeaweedFS."""
