"""Core: types, pytree helpers, local training, rounds, evaluation and the run driver."""
from fedjax_lab.core.types import Algorithm, Model
