import pytest
from cryptography.exceptions import InvalidTag

from fedmq.privacy.sealing import SealedBox, agent_box_info, enrollment_proof, grant_mac, new_keypair, open_box, proof_matches, seal


def test_seal_opens_only_for_recipient_and_context():
    priv, pub = new_keypair()
    other, _ = new_keypair()
    info = agent_box_info("t", "agent-1")
    box = seal(pub, b"secret context", info)
    assert b"secret context" not in box.ciphertext
    assert open_box(priv, box, info) == b"secret context"
    with pytest.raises(InvalidTag):
        open_box(other, box, info)
    with pytest.raises(InvalidTag):
        open_box(priv, box, agent_box_info("t", "agent-2"))
    with pytest.raises(InvalidTag):
        open_box(priv, SealedBox(box.ephemeral_key, box.nonce, box.ciphertext[:-1] + b"\0"), info)


def test_enrollment_proof_binds_everything():
    _, pub = new_keypair()
    nonce = b"n" * 16
    p = enrollment_proof("cred", "t", "a", pub, nonce, 1000.0)
    assert proof_matches(p, enrollment_proof("cred", "t", "a", pub, nonce, 1000.0))
    for changed in (("bad", "t", "a", pub, nonce, 1000.0), ("cred", "u", "a", pub, nonce, 1000.0),
                    ("cred", "t", "b", pub, nonce, 1000.0), ("cred", "t", "a", new_keypair()[1], nonce, 1000.0),
                    ("cred", "t", "a", pub, b"m" * 16, 1000.0), ("cred", "t", "a", pub, nonce, 1001.0)):
        assert not proof_matches(p, enrollment_proof(*changed))


def test_grant_mac_binds_everything():
    _, pub = new_keypair()
    args = ("cred", "t", "a", pub, b"n" * 16, b"sealed box")
    mac = grant_mac(*args)
    for i, other in enumerate(("bad", "u", "b", new_keypair()[1], b"m" * 16, b"other box")):
        changed = list(args)
        changed[i] = other
        assert not proof_matches(mac, grant_mac(*changed))
    assert proof_matches(mac, grant_mac(*args))
