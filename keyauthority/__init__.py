"""Key authority role: generates the task's CKKS keys, enrolls agents, and hands the
secret context only to authenticated agents (sealed to each), the aggregator only
the public parameters."""
