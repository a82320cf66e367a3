"""Choosing what not to compress.

    horovodrun -np 2 -H localhost:2 --gloo python examples/what_not_to_compress.py

By default gradients with fewer than 1024 elements (biases, LayerNorm scales) are sent
uncompressed: compressing them saves a few bytes but costs a kernel, index overhead and a
residual. ``compress_patterns`` overrides that by parameter name (``fnmatch`` patterns, the
first match wins): ``False`` keeps a tensor dense whatever its size — here the output layer,
whose gradient is spread over every word and loses the most under TopK — and ``True``
compresses a small tensor anyway. Uncompressed tensors are allreduced and keep no residual;
``opt.uncompressed`` lists them. A pattern that matches no name raises ``ValueError``.
"""
import horovod.torch as hvd
import torch
from torch import nn

import horovod_gravac as hg


class TinyLM(nn.Module):
    def __init__(self, vocab=500, width=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.decoder(self.norm(hidden))


hvd.init()
torch.manual_seed(0)
model = TinyLM()
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
base = torch.optim.SGD(model.parameters(), lr=0.5)
opt = hg.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                              compression="topk:50",
                              compress_patterns={"decoder.*": False, "lstm.bias_hh_l0": True})
gen = torch.Generator().manual_seed(hvd.rank())
for step in range(30):
    tokens = torch.randint(500, (8, 12), generator=gen)
    opt.zero_grad()
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, 500), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
if hvd.rank() == 0:
    print(f"uncompressed: {sorted(opt.uncompressed)}")
    print(f"loss {loss.item():.3f}; {opt.communication.last_bytes} bytes per step vs "
          f"{opt.communication.last_dense_bytes} dense")
