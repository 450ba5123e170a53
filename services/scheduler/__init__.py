"""The MPI scheduler: rank 0 serves the Scheduler API, worker ranks each drive one llama-server."""
