"""``fedmq fleet``: hundreds of real agents on one machine (issue 17)."""
