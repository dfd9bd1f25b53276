"""Runtime plumbing shared by the role daemons.

Validated YAML configs (``config``), the paho MQTT session (``mqtt_session``),
phase telemetry and its SQLite store (``telemetry``, ``telemetry_db``), systemd
integration (``sd_notify``, ``systemd_unit``, ``signals``), device profiles,
owner-only files for secrets (``private_files``) and log setup.
"""
