"""Selective Parameter Encryption across processes: encrypted mask agreement, then
rounds in which the masked part is summed as ciphertexts and the rest in the clear."""

import numpy as np
import pytest

from fedmq.privacy import he, masking
from fedmq.protocol import wire
from tests.conftest import decrypted_average, oracle, plaintext_fedavg, secret_context

pytestmark = pytest.mark.slow
AGENTS = ["agent-1", "agent-2", "agent-3"]


def test_sensitivity_mask_agreement_and_selective_rounds(cluster_factory):
    prot = wire.Protection(p=0.3, mode="sensitivity", include_first_last=True)
    with cluster_factory(n_agents=3, rounds=2, protection=prot, chunk_size=64 * 1024) as (cluster, obs):
        # Round 1: the encrypted mask agreement.
        obs.wait_for("result", 1, timeout=120)
        sens = obs.results[1]
        assert sens.purpose == "sensitivity" and sens.participants == AGENTS
        public = he.load_context(he.serialize_public(secret_context(cluster)))
        with pytest.raises(he.HEError, match="no secret key"):  # what the aggregator holds
            he.decrypt(public, sens.ciphertexts, sens.n_encrypted)
        agreed = he.decrypt(secret_context(cluster), sens.ciphertexts, sens.n_encrypted) / sens.total_weight
        expected, _ = plaintext_fedavg(cluster, 1, AGENTS, key="scores", name="round1-sensitivity")
        assert np.abs(agreed - expected).max() <= 1e-6 * np.abs(expected).max()

        # Rounds 2 and 3: every agent derived the same mask, so every update was accepted.
        for rnd in (2, 3):
            obs.wait_for("result", rnd, timeout=120)
            obs.wait_for("closed", rnd, timeout=30)
            closed = obs.rounds[rnd].closed
            assert closed.status == "aggregated" and closed.participants == AGENTS
            masks = [oracle(cluster, a, f"round{rnd}")["mask"] for a in AGENTS]
            assert all((m == masks[0]).all() for m in masks)
            mask = masks[0]
            n = mask.size
            assert mask.sum() >= masking.n_selected(n, 0.3)
            result = obs.results[rnd]
            assert result.n_encrypted == mask.sum() and result.mask_digest == masking.mask_digest(mask)
            fedavg, _ = plaintext_fedavg(cluster, rnd, AGENTS)
            got = decrypted_average(cluster, result, mask)
            rel = np.linalg.norm(got - fedavg) / np.linalg.norm(fedavg)
            assert rel < 1e-6, f"round {rnd}: relative error {rel}"
            # Fewer bytes than full encryption: here the forced first layer alone is 63% of the MLP.
            full_encryption = 3 * he.n_ciphertexts(n, 2048) * 2048 * 30
            assert closed.bytes_received < 0.85 * full_encryption
        # The agreed mask is the top-p of the aggregated sensitivity (+ first/last layers).
        sizes = [64 * 64 + 64, 64 * 32 + 32, 32 * 10 + 10]
        forced = masking.first_last_layers(sizes)
        from_oracle = masking.top_p_mask(expected, 0.3, forced)
        assert (from_oracle == mask).mean() > 0.999
        assert "rejected" not in cluster.log_text("aggregator")


def test_random_selection_with_float16_plaintext(cluster_factory):
    prot = wire.Protection(p=0.5, mode="random", seed=3, plain_dtype="float16")
    with cluster_factory(n_agents=2, rounds=1, protection=prot) as (cluster, obs):
        obs.wait_for("result", 1, timeout=120)
        obs.wait_for("closed", 1, timeout=30)
        assert obs.rounds[1].closed.participants == ["agent-1", "agent-2"]
        result = obs.results[1]
        mask = oracle(cluster, "agent-1", "round1")["mask"]
        assert (mask == masking.random_mask(mask.size, 0.5, seed=3)).all()
        dumps = [oracle(cluster, a, "round1") for a in ("agent-1", "agent-2")]
        total = sum(int(d["num_samples"]) for d in dumps)
        # The plaintext half travels as float16: compare with what was actually sent.
        sent = [np.where(mask, d["weights"], d["weights"].astype(np.float16)) for d in dumps]
        expected = sum(w * int(d["num_samples"]) for w, d in zip(sent, dumps)) / total
        assert np.abs(decrypted_average(cluster, result, mask) - expected).max() < 1e-6
