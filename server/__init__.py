"""MedTune's Flower ServerApp: the coordinator that aggregates prompts and heads."""
