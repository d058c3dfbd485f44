"""Experiments over the core: references (baselines), privacy/accuracy sweeps and their report,
recipe tuning on validation data, throughput (perf), synthetic difficulty and the membership audit.

Nothing here runs in a hospital's training path: these modules read the core, never the reverse.
"""
