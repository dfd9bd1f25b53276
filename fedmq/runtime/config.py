"""Role configuration: YAML files validated by pydantic.

A bad file fails at start-up with one line per problem that names the file, the
key and what was expected, e.g. ``configs/agent.yaml: broker.port: Input should
be less than or equal to 65535 (got 70000)``. Secrets are never echoed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, ValidationError, model_validator

from fedmq.protocol.topics import ID_PATTERN
from fedmq.protocol.wire import Protection

Id = Annotated[str, StringConstraints(pattern=rf"^{ID_PATTERN}$")]
Port = Annotated[int, Field(ge=1, le=65535)]
KiB = 1024
_SECRET_KEYS = {"credential", "password", "credentials"}


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerEndpoint(_Section):
    """How a role reaches the MQTT broker (embedded amqtt, mosquitto, RabbitMQ)."""

    host: str = "127.0.0.1"
    port: Port = 1883
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: Annotated[int, Field(ge=5, le=3600)] = 30
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = 32
    connect_timeout_s: Annotated[float, Field(gt=0)] = 15.0
    # clean_session=false: the broker keeps our subscriptions and queues QoS 1 messages
    # while we are briefly away (a Wi-Fi drop, a restart), and delivers them on return.
    persistent_session: bool = True
    # Other nodes of a clustered broker, "host:port", tried in turn (after host:port) when
    # the connection is lost or the first node is down; the same credentials and TLS.
    failover: list[Annotated[str, StringConstraints(pattern=r"^[^\s:]+:[0-9]{1,5}$")]] = Field(default_factory=list)

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """Every node to try, this endpoint's own first."""
        return [(self.host, self.port), *((h, int(p)) for h, p in (n.rsplit(":", 1) for n in self.failover))]


class HeSettings(_Section):
    poly_modulus_degree: Literal[2048, 4096, 8192, 16384, 32768] = 4096
    coeff_mod_bit_sizes: Annotated[list[Annotated[int, Field(ge=20, le=60)]], Field(min_length=2)] = [54, 55]
    scale_bits: Annotated[int, Field(ge=20, le=58)] = 30


class BfvSettings(_Section):
    poly_modulus_degree: Literal[4096, 8192, 16384] = 4096
    coeff_mod_bit_sizes: Annotated[list[Annotated[int, Field(ge=20, le=60)]], Field(min_length=2)] = [54, 55]
    plain_modulus_bits: Annotated[int, Field(ge=17, le=60)] = 36


class LayerQuantSettings(_Section):
    bits: Literal[8, 16] = 8
    mode: Literal["symmetric", "asymmetric"] = "symmetric"
    rounding: Literal["nearest", "stochastic"] = "stochastic"
    lo: float = -1.0
    hi: float = 1.0


class QuantizationSettings(_Section):
    """The secret plan; the layer list repeats over the model's layers."""

    layers: Annotated[list[LayerQuantSettings], Field(min_length=1)] = [LayerQuantSettings()]
    n_ref: Annotated[int, Field(ge=1)] = 100
    max_agents: Annotated[int, Field(ge=1)] = 16


class ModelSettings(_Section):
    """The model every agent of a task trains; all agents of a task must agree."""

    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = [64, 32]
    init_seed: int = 0


class DataSettings(_Section):
    shard: Annotated[int, Field(ge=0)] = 0
    num_shards: Annotated[int, Field(ge=1)] = 1
    seed: int = 0
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2


class TrainSettings(_Section):
    epochs: Annotated[int, Field(ge=1, le=1000)] = 5
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0)] = 0.1
    torch_threads: Annotated[int, Field(ge=1)] = 1
    device: Literal["cpu", "cuda"] = "cpu"
    mixed_precision: bool = False  # autocast on CUDA
    sensitivity_samples: Annotated[int, Field(ge=1)] = 64  # K of the sensitivity map


class FaultSettings(_Section):
    """Fault injection for tests and field tests; all off by default."""

    chunk_delay_s: Annotated[float, Field(ge=0)] = 0.0
    # Test-only: dump plaintext updates for an exactness oracle. It defeats every
    # protection, so it needs the explicit flag below and the agent warns at start.
    oracle_dir: Path | None = None
    test_plaintext_dumps: bool = False

    @model_validator(mode="after")
    def _dumps_need_the_flag(self) -> "FaultSettings":
        if self.oracle_dir is not None and not self.test_plaintext_dumps:
            raise ValueError("oracle_dir writes plaintext updates: set test_plaintext_dumps: true as well "
                             "(tests and field tests only, never a real device)")
        return self


# A public key in a config: 64 hex characters, or the path of the ``.pub`` file a
# role's ``fedmq signing-key`` wrote (resolved when the role starts).
PublicKeyRef = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class DpSettings(_Section):
    """Client-level differential privacy: the key authority calibrates the noise
    multiplier so that ``rounds`` rounds spend at most ``epsilon`` at ``delta``."""

    epsilon: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    clip: Annotated[float, Field(gt=0)] = 1.0  # L2 norm bound of one update's change
    rounds: Annotated[int, Field(ge=1)] = 10  # rounds the budget must last


class PolicySettings(_Section):
    """The task's rules, sealed with the keys (agents enforce them on every round)."""

    # Selective Parameter Encryption: scheme, p (0 plaintext .. 1 full), mode
    # sensitivity|random, include_first_last, seed (random mode), plain_dtype,
    # secure_masking (pairwise masks on every part the aggregator can read).
    protection: Protection = Protection()
    min_agents: Annotated[int, Field(ge=1)] = 2  # no round with a smaller quorum or selection
    max_samples: Annotated[int, Field(ge=1, le=1 << 40)] = 1_000_000  # per update, enforced by the aggregator
    dp: DpSettings | None = None

    @model_validator(mode="after")
    def _dp_is_calibrated_here(self) -> "PolicySettings":
        if self.protection.dp is not None:
            raise ValueError("set policy.dp (epsilon, delta, clip, rounds), not protection.dp: the key authority "
                             "calibrates the noise")
        return self


class WorkloadSettings(_Section):
    """What this agent trains (fedmq.learning.workload): a built-in name (digits-mlp,
    image-folder, csv), ``module:attribute``, or an entry point of ``fedmq.workloads``."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] = "digits-mlp"
    data_dir: Path | None = None  # this device's data, passed to the workload
    options: dict[str, Any] = Field(default_factory=dict)  # free-form; validated by the workload
    # Identical start on every agent: weights drawn from this seed by the agent itself
    # (independent of torch's build or device), or a safetensors file whose SHA-256 the task names.
    init_seed: int = 0
    initial_weights: Path | None = None
    initial_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _file_needs_its_hash(self) -> "WorkloadSettings":
        if self.initial_weights is not None and self.initial_sha256 is None:
            raise ValueError("initial_weights needs initial_sha256 (sha256sum of the file), so every agent "
                             "provably starts from the same weights")
        return self


class AgentConfig(_Section):
    agent_id: Id
    credential: SecretStr
    # The key authority's Ed25519 public key: grants and refusals must carry its signature.
    authority_key: PublicKeyRef | None = None
    task: Id = "digits"
    broker: BrokerEndpoint = BrokerEndpoint()
    state_dir: Path = Path("state/agent")
    chunk_size: Annotated[int, Field(ge=1 * KiB, le=64 * 1024 * KiB)] = 256 * KiB
    enroll_retry_s: Annotated[float, Field(gt=0)] = 5.0
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    faults: FaultSettings = FaultSettings()
    # None: digits-mlp, configured by the model/data/train sections above (as before workloads).
    workload: WorkloadSettings | None = None
    checkpoints: Annotated[int, Field(ge=1)] | None = None  # keep the last K global models as safetensors

    def effective_workload(self) -> WorkloadSettings:
        """The agent's workload; without a ``workload:`` section, digits-mlp configured by
        the model/data/train sections (how agents were configured before workloads)."""
        if self.workload is not None:
            return self.workload
        m, d, t = self.model, self.data, self.train
        return WorkloadSettings(name="digits-mlp", init_seed=m.init_seed, options={
            "hidden": list(m.hidden), "shard": d.shard, "num_shards": d.num_shards, "seed": d.seed,
            "test_fraction": d.test_fraction, "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
            "mixed_precision": t.mixed_precision})
    # Fills in what this file leaves unset (device, threads, batch and chunk size,
    # memory ceiling): auto | raspberry-pi | laptop | gpu-server. See device_profiles.py.
    profile: Literal["auto", "raspberry-pi", "laptop", "gpu-server", "none"] = "none"
    he_threads: Annotated[int, Field(ge=1)] | None = None
    memory_limit_mb: Annotated[int, Field(ge=64)] | None = None  # the agent declines rounds that would exceed it


class AggregatorConfig(_Section):
    aggregator_id: Id = "aggregator"
    task: Id = "digits"
    broker: BrokerEndpoint = BrokerEndpoint()
    state_dir: Path = Path("state/aggregator")
    authority_key: PublicKeyRef | None = None  # the key authority's: the public context must carry its signature
    signing_key: Path | None = None  # this aggregator's Ed25519 key (default: state_dir/signing.key)
    rounds: Annotated[int, Field(ge=0)] = 5  # 0: run until stopped
    min_agents: Annotated[int, Field(ge=1)] = 2  # quorum
    max_agents: Annotated[int, Field(ge=1)] = 1000
    # Over-provisioning: select this many times the quorum (at random among the online
    # agents, at least the quorum), so dropouts still leave a quorum. 0: every online agent.
    overprovision: Annotated[float, Field(ge=0)] = 0.0
    selection_seed: int = 0
    # A round starts as soon as target_agents are online, or, with at least
    # min_agents online, once selection_grace_s has passed (0: target = min_agents).
    target_agents: Annotated[int, Field(ge=0)] = 0
    selection_grace_s: Annotated[float, Field(ge=0)] = 5.0
    round_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # How long an agent's last will must stand before a round stops waiting for it:
    # agents reconnect within seconds of a broker restart or a Wi-Fi blip.
    offline_grace_s: Annotated[float, Field(ge=0)] = 8.0
    metrics_port: Port | None = None  # Prometheus /metrics on metrics_host (off by default)
    metrics_host: str = "127.0.0.1"
    telemetry_linger_s: Annotated[float, Field(ge=0)] = 10.0  # after the last round, wait for its telemetry
    unmask_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # secure masking: wait this long for the correction
    inbox_max_bytes: Annotated[int, Field(ge=1 * KiB)] = 16 * 1024 * KiB  # inbound backlog in memory; the rest spools
    wait_for_agents_s: Annotated[float, Field(gt=0)] = 120.0
    chunk_size: Annotated[int, Field(ge=1 * KiB, le=64 * 1024 * KiB)] = 256 * KiB
    # The task's protection comes from the key authority's policy; set here, it must match it.
    protection: Protection | None = None
    max_message_bytes: Annotated[int, Field(ge=2 * KiB)] = 1024 * KiB
    # Update chunks parked on disk while a restarted aggregator waits for the public context.
    max_parked_bytes: Annotated[int, Field(ge=1 * KiB)] = 256 * 1024 * KiB
    max_update_bytes: Annotated[int, Field(ge=1 * KiB)] = 2 * 1024 * 1024 * KiB
    # Sharded aggregation (aggregator/shard_worker.py). On the root: the workers that fold
    # the round's agents, a shard each; the root combines their partial sums, waiting up
    # to partial_grace_s past the agents' deadline. On a worker: shard_worker: true.
    shard_workers: list[Id] = Field(default_factory=list, max_length=1024)
    partial_grace_s: Annotated[float, Field(ge=0)] = 30.0
    shard_worker: bool = False

    @model_validator(mode="after")
    def _one_shard_role(self) -> "AggregatorConfig":
        if self.shard_worker and self.shard_workers:
            raise ValueError("shard_worker: true (this process folds one shard) and shard_workers (this process is "
                             "the root) exclude each other")
        if len(set(self.shard_workers)) != len(self.shard_workers):
            raise ValueError("shard_workers names a worker twice")
        return self


class KeyAuthorityConfig(_Section):
    authority_id: Id = "keyauthority"
    task: Id = "digits"
    broker: BrokerEndpoint = BrokerEndpoint()
    state_dir: Path = Path("state/keyauthority")
    signing_key: Path | None = None  # Ed25519 key signing what it issues (default: state_dir/signing.key)
    aggregator_key: PublicKeyRef | None = None  # the aggregator's public key, sealed into the policy
    # Sharded aggregation: each shard worker's public key (hex or file), sealed into the policy.
    worker_keys: dict[Id, PublicKeyRef] = Field(default_factory=dict)
    policy: PolicySettings = PolicySettings()
    he: HeSettings = HeSettings()
    bfv: BfvSettings = BfvSettings()
    quantization: QuantizationSettings | None = None  # the plan for quantize / quantize+he tasks
    chunk_size: Annotated[int, Field(ge=1 * KiB)] = 256 * KiB
    max_clock_skew_s: Annotated[float, Field(gt=0)] = 300.0
    credentials: dict[Id, SecretStr] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _quantized_tasks_have_a_plan(self) -> "KeyAuthorityConfig":
        """A quantize task without a ``quantization:`` section gets the default plan
        (int8, [-1, 1], 16 agents) rather than agents that skip every round."""
        if self.policy.protection.scheme != "ckks" and self.quantization is None:
            object.__setattr__(self, "quantization", QuantizationSettings())  # frozen after validation
        return self


class BrokerServerConfig(_Section):
    """The embedded broker (``fedmq broker``)."""

    host: str = "127.0.0.1"
    port: Port = 1883
    max_connections: Annotated[int, Field(ge=0)] = 0


C = TypeVar("C", bound=BaseModel)


def load(model: type[C], path: str | Path, overrides: dict | None = None) -> C:
    """Load and validate a YAML config; raises ConfigError naming file and keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    if overrides:
        raw = {**raw, **overrides}
    try:
        config = model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<top>"
            # Echo the value only under a key known to hold no secret: a misspelled
            # `pasword:` or an agent id under `credentials:` is never printed.
            leaf = str(err["loc"][-1]) if err["loc"] else ""
            public = leaf in _PUBLIC_KEYS and not _SECRET_KEYS & {str(p) for p in err["loc"]}
            got = f" (got {err.get('input')!r})" if public else ""
            if err["type"] == "missing":
                got = ""
            lines.append(f"{path}: {loc}: {err['msg']}{got}")
        raise ConfigError("\n".join(lines)) from None
    if _holds_secret(raw) and os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        import logging

        logging.getLogger(__name__).warning("%s holds secrets but is readable by group/others; chmod 600 it", path)
    return config


def _holds_secret(raw: dict) -> bool:
    return any(k in _SECRET_KEYS for k in raw) or any(
        isinstance(v, dict) and _holds_secret(v) for v in raw.values())


def apply_profile(cfg: AgentConfig) -> AgentConfig:
    """The agent config with its device profile's values where the file set none."""
    if cfg.profile == "none":
        return cfg
    from fedmq.runtime.device_profiles import resolve

    prof = resolve(cfg.profile)
    train_set, top_set = cfg.train.model_fields_set, cfg.model_fields_set
    train = cfg.train.model_copy(update={k: v for k, v in {
        "device": prof.device, "torch_threads": prof.torch_threads, "batch_size": prof.batch_size,
        "mixed_precision": prof.mixed_precision}.items() if k not in train_set})
    top = {k: v for k, v in {"chunk_size": prof.chunk_size, "he_threads": prof.he_threads,
                             "memory_limit_mb": prof.memory_limit_mb}.items() if k not in top_set}
    return cfg.model_copy(update={"train": train, **top})


def dump(config: BaseModel) -> str:
    """YAML for a config, secrets included (write it with private_files)."""
    def reveal(obj):
        if isinstance(obj, SecretStr):
            return obj.get_secret_value()
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, dict):
            return {k: reveal(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [reveal(v) for v in obj]
        return obj

    return yaml.safe_dump(reveal(config.model_dump()), sort_keys=False)


def _field_names(model: type[BaseModel], seen: set | None = None) -> set[str]:
    seen = set() if seen is None else seen
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for arg in [info.annotation, *getattr(info.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                seen.add(arg)
                names |= _field_names(arg, seen)
    return names


# Keys whose values an error message may echo: every field of the configs but the secrets.
_PUBLIC_KEYS = set().union(*(_field_names(m) for m in (AgentConfig, AggregatorConfig, KeyAuthorityConfig,
                                                         BrokerServerConfig))) - _SECRET_KEYS
