"""A local Wiro-compatible upstream for end-to-end tests, benchmarks and ``dev``."""

from app.simulator.app import create_sim_app
from app.simulator.config import SimConfig

__all__ = ["SimConfig", "create_sim_app"]
