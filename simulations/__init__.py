"""Simulated users and what runs them: ``fedpal simulate`` as one Flower app (``experiment``,
launched by ``runner`` through ``engine``), population studies (``population``), privacy
attacks and audits (``privacy``), reports and plots, benchmarks (``benchmarks``)."""
