"""``fedmq broker provision``: a locked-down mosquitto for one task, and every role's config.

Writes, into one directory:

- ``mosquitto.conf`` — one listener (TLS with ``--tls``), ``allow_anonymous false``,
  the password and ACL files, persistence, and a ``max_packet_size`` that fits the
  chunk size plus the envelope (a larger packet is refused by the broker);
- ``passwd`` — PBKDF2-SHA512 hashes in mosquitto 2's own ``$7$`` format;
- ``acl`` — each agent may publish only its own update, status, telemetry and
  enrollment topics and read only its own key topic and the round topics; the
  aggregator reads updates, statuses and telemetry and writes rounds, and can never
  read a key topic; the key authority alone publishes keys;
- with ``--tls``: a CA and a server certificate (``cryptography``), and each role's
  config pointing at the CA;
- with ``--rabbitmq``: ``rabbitmq/definitions.json`` and ``rabbitmq/rabbitmq.conf``,
  the same users and topic discipline for RabbitMQ's MQTT plugin
  (``rabbitmq_permissions.py``);
- with ``shard_workers``: a user, ACL section, signing key and ``shard-K.yaml`` per shard
  worker (it reads only ``shards/<task>/shard-K/#``; the aggregator reads partial sums);
- ``keyauthority.yaml``, ``aggregator.yaml``, ``agent-N.yaml`` — with their broker
  credentials and the agents' enrollment credentials, mode 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from broker import rabbitmq_permissions
from fedmq.runtime import config as cfgmod
from fedmq.privacy import signing
from fedmq.runtime.private_files import ensure_private_dir, write_private

ENVELOPE_OVERHEAD = 4096  # msgpack envelope fields around a chunk, and the MQTT header
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A password-file entry mosquitto 2 verifies: ``$7$iterations$salt$PBKDF2-SHA512``."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(task: str, aggregator: str = "aggregator", authority: str = "keyauthority",
             workers: list[str] | None = None) -> str:
    """Patterns (%u = the authenticated user name = the agent id) for every agent, and
    explicit sections for the services (and shard workers, each reading its own shard)."""
    return "\n".join([
        "# Written by fedmq broker provision. Patterns apply to every user; %u is its user name.",
        "# Agents: their own topics only, and the round topics.",
        f"pattern write updates/{task}/+/%u/+",
        f"pattern write shards/{task}/+/+/%u/+",
        "pattern write agents/%u/status",
        "pattern write telemetry/%u",
        f"pattern write enroll/{task}/%u",
        f"pattern read keys/{task}/agents/%u/+",
        f"pattern read rounds/{task}/+/start",
        f"pattern read rounds/{task}/+/closed",
        f"pattern read rounds/{task}/+/result/+",
        f"pattern read rounds/{task}/+/resend/%u",
        f"pattern read rounds/{task}/rollcall",
        "",
        "# The aggregator: updates, statuses, telemetry in; rounds out; the public context.",
        "# No key topic of any agent, ever.",
        f"user {aggregator}",
        f"topic read updates/{task}/#",
        "topic read agents/+/status",
        "topic read telemetry/+",
        f"topic readwrite rounds/{task}/#",
        f"topic read keys/{task}/public/+",
        f"topic write masks/{task}/+/request",
        f"topic read masks/{task}/+/correction/+",
        *([f"topic read partials/{task}/#"] if workers else []),
        "",
        *[line for w in workers or [] for line in (
            f"# Shard worker {w}: its own shard's updates in, its partial sums and resend requests out.",
            f"user {w}",
            f"topic read shards/{task}/{w}/#",
            "topic read agents/+/status",
            f"topic read rounds/{task}/+/start",
            f"topic write rounds/{task}/+/resend/+",
            f"topic write partials/{task}/+/{w}/+",
            f"topic read keys/{task}/public/+",
            "")],
        "# The key authority: enrollments in, keys out; mask recovery requests in, corrections out.",
        f"user {authority}",
        f"topic read enroll/{task}/+",
        f"topic write keys/{task}/#",
        f"topic read masks/{task}/+/request",
        f"topic write masks/{task}/+/correction/+",
        "",
    ])


@dataclass
class Provisioned:
    out: Path
    port: int
    tls: bool
    agents: list[str]

    @property
    def conf(self) -> Path:
        return self.out / "mosquitto.conf"

    def config(self, role: str) -> Path:
        return self.out / f"{role}.yaml"


def _tls_files(out: Path, host: str) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmq broker CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=825))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=397))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = out / "ca.crt", out / "server.crt", out / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    write_private(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # The CA's key is not needed after signing: not kept, so nothing else can be issued with it.
    return ca_path, cert_path, key_path


def provision(out: Path, *, agents: int, port: int = 8883, host: str = "127.0.0.1", tls: bool = False,
              task: str = "digits", chunk_size: int = 256 * 1024, rounds: int = 5,
              state_root: Path | None = None, run_as: str | None = None, rabbitmq: bool = False,
              max_queued_mib: int = 1024, shard_workers: int = 0) -> Provisioned:
    """``run_as``: the ``user`` mosquitto runs as (it must read passwd, acl and the
    key); by default mosquitto started as root switches to ``mosquitto``, so chown
    those files to it."""
    ensure_private_dir(out)
    state_root = state_root or out / "state"
    ids = [f"agent-{i + 1}" for i in range(agents)]
    workers = [f"shard-{k + 1}" for k in range(shard_workers)]
    passwords = {name: secrets.token_urlsafe(24) for name in ["aggregator", "keyauthority", *workers, *ids]}
    write_private(out / "passwd", "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in passwords.items()).encode())
    write_private(out / "acl", acl_text(task, workers=workers).encode())
    lines = [
        "# Written by fedmq broker provision.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        f"max_packet_size {chunk_size + ENVELOPE_OVERHEAD}",
        "max_queued_messages 100000",
        # Bytes as well as messages: a slow aggregator must not make the broker hold
        # gigabytes (a fifty-upload backlog once reached ~2 GB). Dropped chunks are
        # asked for again by the aggregator's resend requests.
        f"max_queued_bytes {max_queued_mib * 1024 * 1024}",
        "persistence true",
        f"persistence_location {out}/",
        "log_dest stdout",
        *([f"user {run_as}"] if run_as else []),
        f"listener {port} {host}",
        # (A listener option: after the listener line, or mosquitto opens a default one on 1883.)
        # The client id is the authenticated user name: agent-1 cannot connect as
        # "aggregator" and kick the real one off.
        "use_username_as_clientid true",
    ]
    ca = None
    if tls:
        ca, cert, key = _tls_files(out, host)
        lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]
    (out / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def endpoint(user: str) -> cfgmod.BrokerEndpoint:
        return cfgmod.BrokerEndpoint(host=host, port=port, username=user, password=passwords[user], tls_ca=ca)

    creds = {a: secrets.token_urlsafe(24) for a in ids}
    # Signing keys beside the configs (0600): each role's config names the other's public key.
    keys = {role: out / f"{role}-signing.key" for role in ("keyauthority", "aggregator", *workers)}
    public = {role: signing.public_bytes(signing.load_or_create(path)).hex() for role, path in keys.items()}
    quorum = max(1, min(2, agents))
    configs = {
        "keyauthority": cfgmod.KeyAuthorityConfig(task=task, broker=endpoint("keyauthority"),
                                                  state_dir=state_root / "keyauthority", credentials=creds,
                                                  chunk_size=chunk_size, signing_key=keys["keyauthority"],
                                                  aggregator_key=public["aggregator"],
                                                  worker_keys={w: public[w] for w in workers},
                                                  policy=cfgmod.PolicySettings(min_agents=quorum)),
        "aggregator": cfgmod.AggregatorConfig(task=task, broker=endpoint("aggregator"), rounds=rounds,
                                              state_dir=state_root / "aggregator", target_agents=agents,
                                              min_agents=quorum, chunk_size=chunk_size,
                                              signing_key=keys["aggregator"], authority_key=public["keyauthority"],
                                              shard_workers=workers),
        **{w: cfgmod.AggregatorConfig(aggregator_id=w, shard_worker=True, task=task, broker=endpoint(w),
                                      state_dir=state_root / w, chunk_size=chunk_size, signing_key=keys[w],
                                      authority_key=public["keyauthority"]) for w in workers},
    }
    for i, a in enumerate(ids):
        configs[a] = cfgmod.AgentConfig(agent_id=a, credential=creds[a], task=task, broker=endpoint(a),
                                        authority_key=public["keyauthority"],
                                        state_dir=state_root / a, chunk_size=chunk_size,
                                        data=cfgmod.DataSettings(shard=i, num_shards=agents))
    for name, cfg in configs.items():
        write_private(out / f"{name}.yaml", cfgmod.dump(cfg).encode())
    if rabbitmq:
        rmq = ensure_private_dir(out / "rabbitmq")
        write_private(rmq / "definitions.json", rabbitmq_permissions.write_json(
            rabbitmq_permissions.definitions(passwords, task, workers=workers)).encode())
        (rmq / "rabbitmq.conf").write_text("\n".join(rabbitmq_permissions.config_lines(
            str(rmq / "definitions.json"), port, host)) + "\n")
    return Provisioned(out=out, port=port, tls=tls, agents=ids)
