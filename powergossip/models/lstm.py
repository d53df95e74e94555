"""The paper's language model: a 3-layer LSTM with tied input/output embeddings.

embedding(vocab, 650) - dropout 0.4 - LSTM(650, 650, 3 layers, dropout 0.4
between layers) - dropout 0.4 - Linear(650, vocab) whose weight IS the embedding
weight (Press & Wolf 2016; Inan et al. 2016). Tying needs the embedding size to
equal the hidden size, so both are `hidden_size`. Batch first.

Init as in the paper's code (PyTorch word_language_model example): embedding
(= decoder weight) uniform(-0.1, 0.1), decoder bias 0, LSTM PyTorch default.

Parameters: (vocab + 1) * H + layers * (8 H^2 + 8 H), the tied weight counted
once; 10,155,600 + 651 * vocab for H = 650, 3 layers.

vmap: aten::lstm (the fused kernel behind nn.LSTM) has no batching rule, so
torch.func.vmap over stacked parameters cannot call it. The module therefore
also has an unfused path, `_unfused_lstm`, that computes the same recurrence
from the same parameters (self.rnn.weight_ih_l0, ...) with a matmul per gate
block and a loop over time steps (a fixed number, no data-dependent control
flow). `fused=None` (default) picks the fused kernel unless the weights are
wrapped by a torch.func transform (vmap, grad, ...); True / False force
a path. State dicts are the same either way.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LSTMLanguageModel", "lstm"]


class LSTMLanguageModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 650,
        num_layers: int = 3,
        dropout: float = 0.4,
        fused: bool | None = None,
    ):
        super().__init__()
        self.fused = fused
        self.dropout = dropout
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.rnn = nn.LSTM(hidden_size, hidden_size, num_layers=num_layers, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        self.decoder.weight = self.embedding.weight  # tied: one Parameter, listed once
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_hidden(self, batch_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each [num_layers, batch, hidden]."""
        shape = (self.num_layers, batch_size, self.hidden_size)
        dtype = self.embedding.weight.dtype
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor, hidden=None):
        """tokens [batch, T] (int64) -> (logits [batch, T, vocab], (h, c)).

        Pass the returned hidden state (detached, for truncated BPTT) to the next
        call to carry the state across sequence chunks; None starts from zeros.
        """
        emb = self.drop(self.embedding(tokens))
        fused = self.fused
        if fused is None:
            fused = not _in_functorch_transform(self.rnn.weight_ih_l0)
        if fused:
            output, hidden = self.rnn(emb, hidden)
        else:
            output, hidden = self._unfused_lstm(emb, hidden)
        # The decoder reads the embedding weight directly: the tie then survives
        # anything that un-shares the two Parameters (e.g. module.to("meta")).
        logits = F.linear(self.drop(output), self.embedding.weight, self.decoder.bias)
        return logits, hidden

    def _unfused_lstm(self, x: torch.Tensor, hidden=None):
        """nn.LSTM's recurrence (gates i, f, g, o) from self.rnn's parameters.

        x [batch, T, H] -> (output [batch, T, H], (h, c) [layers, batch, H]).
        """
        batch, steps, _ = x.shape
        if hidden is None:
            zeros = x.new_zeros(batch, self.hidden_size)
            h0 = [zeros] * self.num_layers
            c0 = [zeros] * self.num_layers
        else:
            h0, c0 = hidden[0].unbind(0), hidden[1].unbind(0)
        h_out, c_out = [], []
        layer_input = x
        for k in range(self.num_layers):
            w_ih = getattr(self.rnn, f"weight_ih_l{k}")
            w_hh = getattr(self.rnn, f"weight_hh_l{k}")
            bias = getattr(self.rnn, f"bias_ih_l{k}") + getattr(self.rnn, f"bias_hh_l{k}")
            x_gates = torch.matmul(layer_input, w_ih.t()) + bias  # all time steps at once
            h, c = h0[k], c0[k]
            outputs = []
            for t in range(steps):
                gates = x_gates[:, t] + torch.matmul(h, w_hh.t())
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            layer_input = torch.stack(outputs, dim=1)
            if k < self.num_layers - 1:  # nn.LSTM's dropout sits between layers only
                layer_input = F.dropout(layer_input, self.dropout, self.training)
            h_out.append(h)
            c_out.append(c)
        return layer_input, (torch.stack(h_out), torch.stack(c_out))


def _in_functorch_transform(t: torch.Tensor) -> bool:
    """True if t is wrapped by a torch.func transform (vmap's batched tensor, grad's wrapper)."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped(t)) if is_wrapped is not None else False


def lstm(
    vocab_size: int, hidden_size: int = 650, num_layers: int = 3, dropout: float = 0.4, fused: bool | None = None
) -> LSTMLanguageModel:
    return LSTMLanguageModel(vocab_size, hidden_size, num_layers, dropout, fused)
