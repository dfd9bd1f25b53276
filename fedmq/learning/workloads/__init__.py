"""Built-in workloads, each a short module that reads like an example of the
workload API (``fedmq.learning.workload``): ``digits-mlp``, ``image-folder``, ``csv``."""
