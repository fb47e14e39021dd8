"""Population studies: many simulated users, each on its own client node of one Flower app.

``fedpal population run`` runs one preset as a single ``flwr run`` against a SuperLink in
simulation mode (Flower's Simulation Engine on Ray, one machine or a Ray cluster);
``fedpal population study`` runs several and reports where DP stops hurting.
"""
