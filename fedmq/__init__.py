"""fedmq shared core: wire protocol, privacy transforms, configuration and MQTT session.

The role packages (``agent``, ``aggregator``, ``keyauthority``, ``broker``) import
this package; this package never imports a role, except the CLI, which is the
composition root and imports each role lazily inside its own command.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
