"""FedGKT (He et al., NeurIPS 2020): the client/server pair of `--model gkt` (models.gkt). Its
one-round reference for the suite's default pair is not written yet (tests/test_fedgkt.py holds
the numpy reference for a tiny pair): the suite marks the name as missing a reference."""
MODEL = {"fedgkt": "gkt"}
