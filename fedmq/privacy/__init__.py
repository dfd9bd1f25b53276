"""The privacy transforms: everything that protects an update or a key.

The HE backend over TenSEAL (``he``), sealing secrets to one recipient and the
enrollment proof (``sealing``), the quantization plan (``quantization``), which
parameters are encrypted (``masking``, ``sensitivity``), the agent's side of every
scheme (``protection``) and the aggregator's homomorphic running sum
(``aggregation``). Uses the HE and crypto libraries; never hand-rolled primitives.
"""
