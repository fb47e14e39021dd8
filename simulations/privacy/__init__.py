"""Privacy experiments: real attacks on what a fedpal federation releases and sends.

``fedpal privacy audit`` runs fedpal federations with protection off, DP only, SecAgg+
only and both, and attacks them the way a privacy researcher would: membership inference
on the personal and global adapters, canary exposure, inversion of a client's update by
the server, an audited epsilon from one run, budget against utility, and a scan for
memory plaintext in every message and file.
"""
