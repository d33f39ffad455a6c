"""LG-FedAvg (Liang et al. 2020, Algorithm 1) on the zoo's MLP, client by client: the body is each
client's row, the head ("out") averaged (tests/references/fedper.py's round with local="body")."""
from tests.references.fedper import personalized

MODEL = {"lg_fedavg": "mlp"}
REFERENCE = {"lg_fedavg": personalized("body")}
