"""RabbitMQ's MQTT plugin, locked down like mosquitto: the same users, passwords
and per-role topic discipline, as a definitions file the node loads at boot.

RabbitMQ maps an MQTT topic to a routing key on ``amq.topic`` (``/`` becomes
``.``, ``+`` becomes ``*``) and checks *topic permissions* — a write regex on
publish, a read regex on subscribe, matched against the routing key (for a
subscription, the filter with its wildcards). The vhost permissions confine each
user to its own subscription queues (``mqtt-subscription-<client id>qos<n>``),
so a client id that is not the user's own gets no queue. Passwords are stored as
RabbitMQ's own salted SHA-256 hashes (``rabbit_password_hashing_sha256``).

What it cannot do: mosquitto's ``use_username_as_clientid``. A user connecting
with another user's client id is refused any queue, but RabbitMQ may still close
the other session; keep credentials per device and watch the broker's log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re


def rabbit_hash(password: str, salt: bytes | None = None) -> str:
    """base64(salt || SHA-256(salt || password)), 4 bytes of salt: what rabbitmqctl stores."""
    salt = salt or os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _q(name: str) -> str:
    return re.escape(name).replace("/", r"\.")


def topic_rules(task: str, user: str, *, aggregator: str, authority: str,
                workers: list[str] = ()) -> tuple[str, str]:
    """(write, read) regexes over routing keys for one user — the same discipline as
    mosquitto's ACL: agents their own topics, the aggregator never a key topic, a
    shard worker its own shard only."""
    t, u, seg = _q(task), _q(user), r"[^.]+"
    if user == aggregator:
        return (rf"^(rounds\.{t}\..+|masks\.{t}\.{seg}\.request)$",
                rf"^(updates\.{t}\.{seg}\.{seg}\.{seg}|agents\.{seg}\.status|telemetry\.{seg}|keys\.{t}\.public\.{seg}"
                rf"|masks\.{t}\.{seg}\.correction\.{seg}|partials\.{t}\.{seg}\.{seg}\.{seg})$")
    if user in workers:
        return (rf"^(rounds\.{t}\.{seg}\.resend\.{seg}|partials\.{t}\.{seg}\.{u}\.{seg})$",
                rf"^(shards\.{t}\.{u}\.{seg}\.{seg}\.{seg}|agents\.{seg}\.status|rounds\.{t}\.{seg}\.start"
                rf"|keys\.{t}\.public\.{seg})$")
    if user == authority:
        return (rf"^(keys\.{t}\..+|masks\.{t}\.{seg}\.correction\.{seg})$",
                rf"^(enroll\.{t}\.{seg}|masks\.{t}\.{seg}\.request)$")
    return (rf"^(updates\.{t}\.{seg}\.{u}\.{seg}|shards\.{t}\.{seg}\.{seg}\.{u}\.{seg}|agents\.{u}\.status"
            rf"|telemetry\.{u}|enroll\.{t}\.{u})$",
            rf"^(keys\.{t}\.agents\.{u}\.{seg}|rounds\.{t}\.{seg}\.(start|closed|result\.{seg}|resend\.{u})"
            rf"|rounds\.{t}\.rollcall)$")


def definitions(passwords: dict[str, str], task: str, *, aggregator: str = "aggregator",
                authority: str = "keyauthority", vhost: str = "/", workers: list[str] = ()) -> dict:
    users, perms, topics = [], [], []
    for user, password in passwords.items():
        users.append({"name": user, "password_hash": rabbit_hash(password),
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ""})
        own = rf"mqtt-subscription-{re.escape(user)}qos[01]"
        perms.append({"user": user, "vhost": vhost, "configure": rf"^{own}$",
                      "write": rf"^(amq\.topic|{own})$", "read": rf"^(amq\.topic|{own})$"})
        write, read = topic_rules(task, user, aggregator=aggregator, authority=authority, workers=workers)
        topics.append({"user": user, "vhost": vhost, "exchange": "amq.topic", "write": write, "read": read})
    return {"users": users, "vhosts": [{"name": vhost}], "permissions": perms, "topic_permissions": topics}


def config_lines(definitions_path: str, port: int, host: str) -> list[str]:
    """The rabbitmq.conf lines: no anonymous MQTT, no guest, our definitions at boot."""
    return [
        "# Written by fedmq broker provision --rabbitmq.",
        f"mqtt.listeners.tcp.default = {host}:{port}",
        "mqtt.allow_anonymous = false",
        "mqtt.exchange = amq.topic",
        f"load_definitions = {definitions_path}",
    ]


def write_json(defs: dict) -> str:
    return json.dumps(defs, indent=2) + "\n"
