"""fedmq shared core, grouped by idea.

``protocol`` (what travels and how it is checked), ``privacy`` (HE, sealing,
quantization, masks, protection, homomorphic sums), ``learning`` (torch models),
``runtime`` (config, MQTT session, telemetry, systemd plumbing) and ``tools``
(CLI, demo, benchmarks, field tests, audit). The roles (``agent``, ``aggregator``,
``keyauthority``, ``broker``) import the core, never the tools; the core imports
no role and no tool. ``tests/test_layering.py`` enforces it.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
