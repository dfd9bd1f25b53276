"""The HE benchmark's code path on the smallest model: rows complete and honest.
(Speed targets are read from the benchmark's own output, not asserted here.)"""

import json

from fedmq.tools.bench import he_overhead as bench

FIELDS = {"model", "params", "p", "clients", "enc_s", "agg_s", "dec_s", "bytes_per_client", "bytes_per_param",
          "baseline_enc_s", "baseline_agg_s", "baseline_dec_s", "baseline_bytes_per_client"}


def test_bench_rows_and_outputs(tmp_path):
    rows = bench.run(["linear"], ps=(0.0, 0.5, 1.0), reps=1, progress=False)
    assert [(r.mode, r.p) for r in rows] == [("ckks", 0.0), ("ckks", 0.5), ("ckks", 1.0), ("quantize", 0.0),
                                             ("quantize+he", 0.0), ("quantize+he", 0.5), ("quantize+he", 1.0),
                                             ("ckks+mask", 0.0), ("ckks+mask", 0.5), ("quantize+mask", 0.0),
                                             ("quantize+he+mask", 0.0), ("quantize+he+mask", 0.5)]
    masked = {(r.mode, r.p): r for r in rows if r.masked}
    # Masks cancel: the unmasked sum rebuilds the model as well as the plain mode's (fixed point: close).
    assert masked[("quantize+mask", 0.0)].rel_err < 1e-2 and masked[("ckks+mask", 0.5)].rel_err < 1e-4
    assert 2 <= masked[("quantize+mask", 0.0)].bytes_per_param < 2.1  # 16-bit lanes: the sum of 8 int8 codes
    assert all(r.enc_ratio_to_unmasked is not None for r in masked.values())
    quantized = [r for r in rows if r.mode in ("quantize", "quantize+he")]
    assert all(r.rel_err < 1e-2 for r in quantized)  # int8 steps of 0.2/254 on drift of 0.01
    assert {r.p: r for r in quantized if r.mode == "quantize+he"}[1.0].bytes_per_client > \
        [r for r in quantized if r.mode == "quantize"][0].bytes_per_client
    rows = [r for r in rows if r.mode == "ckks"]
    by_p = {r.p: r for r in rows}
    assert all(r.rel_err < 1e-6 for r in rows)
    assert by_p[0.0].bytes_per_param < 4.1  # plaintext float32 plus the envelope
    assert by_p[0.0].bytes_per_client < by_p[0.5].bytes_per_client < by_p[1.0].bytes_per_client
    assert by_p[1.0].bytes_per_param <= 32 < by_p[1.0].baseline_bytes_per_client / rows[0].params
    doc = bench.write(rows, tmp_path / "he.json", quick=True)
    saved = json.loads((tmp_path / "he.json").read_text())
    assert FIELDS <= set(saved["rows"][0]) and saved == json.loads(json.dumps(doc))
    bench.plot(rows, tmp_path / "he.png")
    assert (tmp_path / "he.png").read_bytes()[:4] == b"\x89PNG"
