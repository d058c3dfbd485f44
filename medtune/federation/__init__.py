"""The Flower side of MedTune, shared by the ClientApp (client/) and the ServerApp (server/).

- wire.py: what crosses the wire, in Flower records (one definition for both ends);
- results.py: a federated run's record (results.json), written by the server, read by experiments;
- simulation.py: `medtune simulate`, the Flower Simulation Engine on one machine;
- flower_engine.py: the one call into Flower's private in-process simulation runtime;
- helper_processes.py: Ray's helper processes end with the simulation's process, however it ends;
- site_runtime.py: the one call into Flower's private task runtime, where a site
  (`medtune site run`) claims each message in place of `flwr-clientapp`;
- private_api.py: the check of both fenced modules' private names against the installed Flower.

The rest of `medtune/` is the learning core of one site and never imports Flower (tested).
"""
