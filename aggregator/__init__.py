"""Aggregator role: round orchestration and homomorphic FedAvg. Never holds a secret key."""
