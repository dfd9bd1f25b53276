"""Operator tools, the composition root: the CLI, the demo, local clusters and
broker processes, reports, benchmarks, field tests and the privacy audit.

Tools may import everything — the core and the roles (lazily, inside a command).
Nothing in the core or in a role imports a tool.
"""
