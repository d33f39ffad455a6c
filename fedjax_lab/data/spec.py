"""`load(spec)`: one string names a dataset and its options, e.g. `synthetic:1,1`,
`synthetic:alpha=0.5,beta=0.5,clients=100`, `synthetic_iid`. Used by the CLI's --dataset."""
from __future__ import annotations

from fedjax_lab.data.synthetic import synthetic


def _synthetic(args, kwargs, seed, iid=False):
    names = {"alpha": "alpha", "beta": "beta", "clients": "num_clients", "num_clients": "num_clients",
             "dim": "dim", "classes": "num_classes", "num_classes": "num_classes",
             "iid": "iid", "test_fraction": "test_fraction", "min_size": "min_size",
             "max_size": "max_size"}
    out = {"iid": iid}
    if len(args) > 2:
        raise ValueError(f"synthetic takes at most two positional options (alpha, beta), got {args}")
    for name, v in zip(("alpha", "beta"), args):
        out[name] = float(v)
    for k, v in kwargs.items():
        if k not in names:
            raise ValueError(f"unknown option {k!r} for dataset 'synthetic'; valid options: "
                             f"{sorted(names)}")
        out[names[k]] = _parse_value(v)
    return synthetic(seed=seed, **out)


LOADERS = {
    "synthetic": (lambda a, kw, seed: _synthetic(a, kw, seed),
                  "FedProx's Synthetic(alpha, beta): `synthetic:1,1` or `synthetic:alpha=1,beta=1,clients=30`"),
    "synthetic_iid": (lambda a, kw, seed: _synthetic(a, kw, seed, iid=True),
                      "FedProx's Synthetic-IID (one model, one input distribution for all clients)"),
}


def parse_spec(spec: str):
    """'name:a,b,k=v' -> ('name', ['a', 'b'], {'k': 'v'})."""
    name, _, rest = spec.partition(":")
    args, kwargs = [], {}
    for part in filter(None, (p.strip() for p in rest.split(","))) if rest else []:
        if "=" in part:
            k, v = part.split("=", 1)
            kwargs[k.strip()] = v.strip()
        else:
            args.append(part)
    return name.strip().lower(), args, kwargs


def _parse_value(v: str):
    if isinstance(v, str):
        low = v.lower()
        if low in ("true", "false"):
            return low == "true"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
    return v


def load(spec: str, *, seed: int = 0, **options):
    """Resolve a dataset spec string (plus keyword options, which override the spec's) to
    FederatedArrays. Unknown names or options raise ValueError listing the valid ones."""
    name, args, kwargs = parse_spec(spec)
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {sorted(LOADERS)}")
    kwargs.update({k: v for k, v in options.items() if v is not None})
    return LOADERS[name][0](args, kwargs, seed)
