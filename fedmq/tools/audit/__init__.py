"""``fedmq audit``: gradient-inversion attacks (DLG, iDLG) against every protection mode,
run on what the aggregator actually sees."""
