"""Scenarios (TOML run configs) and the runners that read them."""
