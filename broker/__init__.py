"""Broker role: the embedded MQTT broker for one-command starts.

Production fleets point every role at a real broker (mosquitto, RabbitMQ's MQTT
plugin) through the ``broker:`` section of their config; nothing else changes.
"""
