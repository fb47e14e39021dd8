"""``fedpal simulate`` as one Flower app: the users on their nodes (``node``), the rounds and
the scoring in the ServerApp (``server_app``, ``results``)."""
