"""The Flower side of MedTune, shared by the ClientApp (client/) and the ServerApp (server/).

- wire.py: what crosses the wire, in Flower records (one definition for both ends);
- results.py: a federated run's record (results.json), written by the server, read by experiments;
- simulation.py: `medtune simulate`, the Flower Simulation Engine on one machine;
- flower_engine.py: the one call into Flower's private in-process simulation runtime;
- helper_processes.py: Ray's helper processes end with the simulation's process, however it ends.

The rest of `medtune/` is the learning core of one site and never imports Flower (tested).
"""
