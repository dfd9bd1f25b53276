import os
import stat

import pytest

from fedmq.runtime import config
from fedmq.runtime.private_files import is_private, write_private


def test_valid_example_configs_load():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    config.load(config.AgentConfig, os.path.join(root, "agent.yaml"))
    config.load(config.AggregatorConfig, os.path.join(root, "aggregator.yaml"))
    config.load(config.KeyAuthorityConfig, os.path.join(root, "keyauthority.yaml"))
    config.load(config.BrokerServerConfig, os.path.join(root, "broker.yaml"))


def test_error_names_file_key_and_expectation(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("agent_id: a1\ncredential: hunter2-secret\nbroker:\n  port: 70000\nchunk_size: tiny\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(config.AgentConfig, f)
    text = str(exc.value)
    assert f"{f}: broker.port: Input should be less than or equal to 65535 (got 70000)" in text
    assert f"{f}: chunk_size:" in text and "valid integer" in text
    assert "hunter2" not in text


def test_missing_required_and_unknown_keys(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("credential: x\nbrokr: {}\n")
    text = str(pytest.raises(config.ConfigError, config.load, config.AgentConfig, f).value)
    assert f"{f}: agent_id: Field required" in text
    assert f"{f}: brokr: Extra inputs are not permitted" in text


def test_secret_never_echoed_on_type_error(tmp_path):
    f = tmp_path / "ka.yaml"
    f.write_text("credentials:\n  agent-1: [not, a, string, s3cr3t]\n")
    text = str(pytest.raises(config.ConfigError, config.load, config.KeyAuthorityConfig, f).value)
    assert "credentials.agent-1" in text and "s3cr3t" not in text


def test_unreadable_and_non_mapping(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(config.AgentConfig, tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load(config.AgentConfig, f)


def test_private_files_are_owner_only(tmp_path):
    p = tmp_path / "keys" / "secret.bin"
    write_private(p, b"k")
    assert p.read_bytes() == b"k" and is_private(p)
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700


def test_misspelled_secret_key_is_not_echoed(tmp_path):
    """Issue 14.7: redaction by a positive list — an unknown key's value is never printed."""
    f = tmp_path / "agent.yaml"
    f.write_text("agent_id: a\ncredential: abcdefghijklmnop\nbroker: {pasword: hunter2-s3cr3t, port: 70000}\n")
    text = str(pytest.raises(config.ConfigError, config.load, config.AgentConfig, f).value)
    assert "broker.pasword: Extra inputs are not permitted" in text and "s3cr3t" not in text
    assert "(got 70000)" in text  # a known, non-secret key still shows what it got


def test_plaintext_dumps_need_the_explicit_test_flag(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("agent_id: a\ncredential: abcdefghijklmnop\nfaults: {oracle_dir: /tmp/o}\n")
    text = str(pytest.raises(config.ConfigError, config.load, config.AgentConfig, f).value)
    assert "test_plaintext_dumps: true" in text
    f.write_text("agent_id: a\ncredential: abcdefghijklmnop\nfaults: {oracle_dir: /tmp/o, test_plaintext_dumps: true}\n")
    assert config.load(config.AgentConfig, f).faults.oracle_dir is not None


def test_existing_state_dir_is_not_remoded(tmp_path):
    """Issue 14.7: a shared directory given as state_dir keeps its mode; a new one is 0700."""
    from fedmq.runtime.private_files import ensure_private_dir

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    ensure_private_dir(shared)
    assert shared.stat().st_mode & 0o777 == 0o755
    fresh = ensure_private_dir(tmp_path / "fresh" / "state")
    assert fresh.stat().st_mode & 0o777 == 0o700


def test_cli_version_busy_port_and_ignored_p(tmp_path):
    """Issue 19: `fedmq --version`; a busy port is one line, not a traceback;
    `--scheme quantize --p 0.3` is refused instead of silently ignoring --p."""
    import socket
    import subprocess
    import sys

    fedmq = [sys.executable, "-m", "fedmq"]
    out = subprocess.run([*fedmq, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fedmq ")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = subprocess.run([*fedmq, "broker", "--port", str(s.getsockname()[1])], capture_output=True,
                              text=True, timeout=60)
    text = busy.stdout + busy.stderr
    assert busy.returncode == 2 and "Address already in use" in text and "--port" in text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    demo = subprocess.run([*fedmq, "demo", "--scheme", "quantize", "--p", "0.3"], capture_output=True, text=True)
    assert demo.returncode == 2 and "would be ignored" in demo.stderr
