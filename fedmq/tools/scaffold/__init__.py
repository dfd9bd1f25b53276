"""``fedmq new NAME``: a workload package to start from (like ``flwr new``)."""
