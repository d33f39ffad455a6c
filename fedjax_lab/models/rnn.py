"""Character-level next-character model for Shakespeare (LSTM, or GRU as an option).

LEAF's Shakespeare model (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018;
github.com/TalwalkarLab/leaf, models/shakespeare/stacked_lstm.py), itself FedAvg's (McMahan et
al., 2017, Sec. 3): 80 characters of context, each embedded in 8 dimensions, a 2-layer LSTM with
256 units, and a Dense layer from the last step's output to logits over the 80-character
vocabulary:
    e_t = E[x_t],  h^1_t = LSTM_1(e_t, h^1_{t-1}),  h^2_t = LSTM_2(h^1_t, h^2_{t-1}),
    logits = W h^2_T + b.
Input x: [batch, T] integer character ids; label y: [batch] id of the next character.

Each LSTM layer has one bias per gate (as LEAF's TensorFlow cell; PyTorch's nn.LSTM has two):
4 (d_in h + h^2 + h) parameters. Flax's GRU cell has 3 (d_in h + h^2) + 4h (input biases for
r, z, n and a hidden bias inside the reset gate). With vocabulary 80, embedding 8, hidden 256:
    LSTM: 640 + 271,360 + 525,312 + 20,560 = 817,872 parameters
    GRU:  640 + 203,776 + 394,240 + 20,560 = 619,216 parameters
features(x) is h^2_T (256-d), head(z) the final Dense layer. No dropout (LEAF uses none).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn

from fedjax_lab.core import validate
from fedjax_lab.core.types import Model
from fedjax_lab.models.base import Dense, from_linen

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


class CharRNN(nn.Module):
    num_classes: int
    vocab_size: int
    embed_dim: int = 8
    hidden_size: int = 256
    num_layers: int = 2
    cell: str = "lstm"

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embed_dim)
        self.layers = [nn.RNN(CELLS[self.cell](self.hidden_size)) for _ in range(self.num_layers)]
        self.fc = Dense(self.num_classes)

    def features(self, x, train: bool = False):
        z = self.embed(x)
        for layer in self.layers:
            z = layer(z)
        return z[:, -1]

    def head(self, z):
        return self.fc(z)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


def char_rnn(num_classes: int = 80, *, vocab_size: Optional[int] = None, embed_dim: int = 8,
             hidden_size: int = 256, num_layers: int = 2, cell: str = "lstm") -> Model:
    """Next-character RNN; `vocab_size` defaults to num_classes (the next character is the label)."""
    validate.positive("num_classes", num_classes, integer=True)
    vocab_size = num_classes if vocab_size is None else vocab_size
    for name, v in (("vocab_size", vocab_size), ("embed_dim", embed_dim),
                    ("hidden_size", hidden_size), ("num_layers", num_layers)):
        validate.positive(name, v, integer=True)
    validate.one_of("cell", cell, set(CELLS))
    return from_linen(CharRNN(num_classes, vocab_size, embed_dim, hidden_size, num_layers, cell),
                      f"char_{cell}")


def char_lstm(num_classes: int = 80, *, vocab_size: Optional[int] = None, embed_dim: int = 8,
              hidden_size: int = 256, num_layers: int = 2) -> Model:
    """LEAF's Shakespeare model: embedding 8, 2-layer LSTM 256; 817,872 parameters at 80 classes."""
    return char_rnn(num_classes, vocab_size=vocab_size, embed_dim=embed_dim,
                    hidden_size=hidden_size, num_layers=num_layers, cell="lstm")


def char_gru(num_classes: int = 80, *, vocab_size: Optional[int] = None, embed_dim: int = 8,
             hidden_size: int = 256, num_layers: int = 2) -> Model:
    """The same with GRU cells: 619,216 parameters at 80 classes."""
    return char_rnn(num_classes, vocab_size=vocab_size, embed_dim=embed_dim,
                    hidden_size=hidden_size, num_layers=num_layers, cell="gru")
