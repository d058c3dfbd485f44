"""MedTune's Flower ClientApp: one hospital."""
