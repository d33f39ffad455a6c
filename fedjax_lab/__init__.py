"""fedjax_lab: a vectorized federated-learning simulator in JAX. Every client is a row."""
# the shared values' packages first: each registers its kind with core.setup (core imports none of them)
from fedjax_lab import aggregators, attacks, uplink
from fedjax_lab import algorithms, data, leaderboard, models
from fedjax_lab.core.driver import run
from fedjax_lab.core.hypergrad import hypergrad
from fedjax_lab.core.sweep import sweep
from fedjax_lab.core.setup import Cohort, LocalWork, Optimizer, Setup
from fedjax_lab.core.types import Algorithm, Model
from fedjax_lab.registry import register

__version__ = "0.1.0"
__all__ = ["algorithms", "aggregators", "attacks", "leaderboard", "data", "models", "uplink", "run", "sweep",
           "hypergrad", "register", "Algorithm", "Model", "Setup", "Cohort", "LocalWork", "Optimizer"]
