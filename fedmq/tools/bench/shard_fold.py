"""``fedmq bench shard-fold``: the fold phase of one round on the paper's CNN, by one
aggregator and by K shard workers plus the root's combining — measured in one run
on the same encrypted updates.

What is timed is the aggregator's own work per update, with its own code: decode
the update, add its ciphertexts into the running sum (``RoundSum``), and commit the
new sum to the crash-safe store (``RoundStore.fold``, one transaction per update).
Sharded, each worker does that for its shard in its own process, then encodes its
``PartialSum`` and writes it out; the root decodes the K partials and combines them.
The fold phase is the wall time from the first worker starting to fold to the root
holding the combined sum. The partial's trip through the broker is not in it (the
fleet runs of ``bench scale`` carry that): here the partial goes through a file.
Both sums are decrypted with the secret key at the end and must agree.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CNN_PARAMS = 1_663_370


@dataclass
class ShardFoldRow:
    updates: int
    workers: int
    params: int
    update_mb: float
    single_s: float  # one aggregator folds every update
    sharded_s: float  # K workers fold their shards in parallel, then the root combines
    worker_s: list[float]
    combine_s: float
    speedup: float
    max_abs_diff: float  # decrypted sums of the two ways
    cpus: int


def _fold_worker(public: bytes, files: list[str], state_dir: str, partial_out: str | None) -> tuple[float, float]:
    """Fold ``files`` as an aggregator does; returns (start, end) wall times."""
    from fedmq.privacy import he
    from fedmq.privacy.aggregation import RoundSum
    from fedmq.protocol import wire

    from aggregator.round_state import RoundState
    from aggregator.round_store import RoundStore

    ctx = he.load_context(public)
    store = RoundStore(Path(state_dir))
    agents = [f"agent-{i}" for i in range(len(files))]
    st = RoundState(1, 0, frozenset(agents), 1, time.time() + 3600)
    store.open(st)
    total = RoundSum(quantized=False, ckks=ctx)
    start = time.time()
    for agent, path in zip(agents, files):
        update = wire.decode_body("update", Path(path).read_bytes())
        total.fold(update, consume=True)
        st.record(agent, update.num_samples, time.time())
        store.fold(st, {}, total.meta_bytes(), total.serialized_ciphertexts())
        del update
    if partial_out:
        partial = wire.PartialSum(participants=sorted(st.weights), weights=[st.weights[a] for a in sorted(st.weights)],
                                  dropped=[], layout="null", sum_meta=total.meta_bytes(),
                                  ciphertexts=list(total.serialized_ciphertexts()), bytes_received=0, agg_s=0.0)
        Path(partial_out).write_bytes(wire.encode_body(partial)[1])
    else:
        Path(state_dir, "sum.bin").write_bytes(b"".join(len(c).to_bytes(8, "little") + c
                                                        for c in total.serialized_ciphertexts()))
    return start, time.time()


def _blobs(raw: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        n = int.from_bytes(raw[at:at + 8], "little")
        out.append(raw[at + 8:at + 8 + n])
        at += 8 + n
    return out


def run(updates: int = 12, workers: int = 2, params: int = CNN_PARAMS, progress: bool = True) -> ShardFoldRow:
    from tqdm import tqdm

    from fedmq.privacy import he, protection
    from fedmq.privacy.aggregation import RoundSum
    from fedmq.protocol import wire

    secret = he.create_secret_context(he.CkksParams())
    public = he.serialize_public(secret)
    rng = np.random.default_rng(0)
    spawn = multiprocessing.get_context("spawn")  # TenSEAL and fork do not mix
    with tempfile.TemporaryDirectory(prefix="fedmq-shardfold-") as tmp:
        work = Path(tmp)
        files = []
        for i in tqdm(range(updates), desc="encrypting CNN updates", disable=None if progress else True):
            w = rng.normal(0, 0.05, params)
            upd = protection.protect_ckks(secret, w, 10 + i, np.ones(params, dtype=bool), "float32", updates, None)
            files.append(str(work / f"update-{i}.bin"))
            Path(files[-1]).write_bytes(wire.encode_body(upd)[1])
            del upd
        update_mb = os.path.getsize(files[0]) / 1e6
        with spawn.Pool(workers) as pool:
            pool.starmap(_noop, [()] * workers)  # the pool's processes up and importing before any timing
            (work / "single").mkdir()
            start, end = pool.apply(_fold_worker, (public, files, str(work / "single"), None))
            single_s = end - start
            shards = [files[k::workers] for k in range(workers)]
            args = []
            for k, shard in enumerate(shards):
                (work / f"shard-{k}").mkdir()
                args.append((public, shard, str(work / f"shard-{k}"), str(work / f"partial-{k}.bin")))
            times = pool.starmap(_fold_worker, args)
        t0 = time.time()
        combined = RoundSum(quantized=False, ckks=he.load_context(public))
        for k in range(workers):
            body: wire.PartialSum = wire.decode_body("partial", (work / f"partial-{k}.bin").read_bytes())
            combined.merge(RoundSum.from_stored(body.sum_meta, body.ciphertexts, ckks=combined.ckks))
            del body
        end = time.time()
        sharded_s = end - min(s for s, _ in times)
        n_values = combined.n_encrypted
        a = he.decrypt(secret, he.serialize_all(combined.acc), n_values)
        b = he.decrypt(secret, _blobs((work / "single/sum.bin").read_bytes()), n_values)
    return ShardFoldRow(updates=updates, workers=workers, params=params, update_mb=round(update_mb, 1),
                        single_s=round(single_s, 2), sharded_s=round(sharded_s, 2),
                        worker_s=[round(e - s, 2) for s, e in times], combine_s=round(end - t0, 2),
                        speedup=round(single_s / sharded_s, 2), max_abs_diff=float(np.abs(a - b).max()),
                        cpus=os.cpu_count() or 1)


def _noop() -> None:
    import fedmq.privacy.aggregation  # noqa: F401 - warm the worker's imports
    import aggregator.round_store  # noqa: F401


def write(row: ShardFoldRow, out: Path) -> None:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**asdict(row), "target_speedup": 1.6, "meets_target": row.speedup >= 1.6}, indent=2))
