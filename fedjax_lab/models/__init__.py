"""Model zoo: flax.linen modules wrapped as pure Model records (see models.base)."""
from fedjax_lab.models.base import from_linen
from fedjax_lab.models.linear import logistic, mlp

MODELS = {
    "logistic": (logistic, "multinomial logistic regression"),
    "mlp": (mlp, "MLP with two hidden ReLU layers of 200 (FedAvg's 2NN)"),
}

__all__ = ["from_linen", "logistic", "mlp", "MODELS"]
