"""The torch side: the models fedmq trains and benchmarks.

Imported only where training happens (agents, benchmarks, the audit) — never by
the aggregator or the key authority, which run without torch.
"""
