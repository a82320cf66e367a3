"""The paper's models and CPU-sized versions on the same code path (no torchvision needed).

* ResNet for CIFAR: bottleneck ResNet-101 (ImageNet layout, 10-class head: 42.5M parameters,
  the paper's) and the basic-block CIFAR ResNet-20 (0.27M) for CPUs.
* VGG: VGG16 with a CIFAR-100 head (134.7M, the paper's) and a small VGG for CPUs.
* LSTM language model for PTB: 2×1500 (66M, the paper's), 2×650 and 2×200.
* A GPT-style Transformer language model for PTB (4 layers, width 256, 4 heads, context 64:
  5.7M parameters in 52 tensors), the Transformer workload sized for CPUs.

``torchvision``'s ResNet/VGG are used instead when it is importable and asked for.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or inp != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False),
                                          nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with a CIFAR stem (3×3 conv, no max-pool), so 32×32 inputs keep their resolution."""

    def __init__(self, block: type, blocks: list[int], widths: list[int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, inp = [], widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(block(inp, planes, 2 if (i > 0 and j == 0) else 1))
                inp = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inp, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    def __init__(self, config: list, num_classes: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inp = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(inp, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                inp = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(7 if hidden >= 4096 else 1)
        flat = inp * (49 if hidden >= 4096 else 1)
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM LM (Zaremba et al. 2014 layout): embedding, stacked LSTM, decoder."""

    def __init__(self, vocab: int = 10000, hidden: int = 1500, layers: int = 2,
                 dropout: float = 0.65) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, state = self.lstm(self.dropout(self.embedding(tokens)), state)
        return self.decoder(self.dropout(out)), state


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the past tokens only (PyTorch's fused kernel)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout_p = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = (y.view(b, t, self.heads, w // self.heads).transpose(1, 2)
                   for y in self.qkv(x).split(w, dim=2))
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout_p if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, w))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x)) (GELU, 4× width)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width), nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class GPTLanguageModel(nn.Module):
    """Word-level decoder-only Transformer LM in GPT-2's layout (Radford et al. 2019): token
    and learned position embeddings, pre-LayerNorm blocks of causal self-attention and MLP,
    a final LayerNorm, and a decoder tied to the token embedding.

    ``forward(tokens, state)`` has the LSTM's signature so that both train alike; a
    Transformer keeps no state between windows, so ``state`` is ignored and None returned.
    Windows are at most ``context`` tokens.
    """

    def __init__(self, vocab: int = 10000, width: int = 256, layers: int = 4, heads: int = 4,
                 context: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.context = context
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab, bias=False)
        self.decoder.weight = self.token.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual outputs
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, state: None = None) -> tuple[Tensor, None]:
        length = tokens.size(1)
        if length > self.context:
            raise ValueError(f"a window of {length} tokens is longer than the model's context "
                             f"of {self.context} (--bptt must be <= {self.context})")
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.token(tokens) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        return self.decoder(self.norm(x)), None


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_VGG_SMALL = [32, "M", 64, "M", 128, 128, "M", 256, 256, "M"]

class MLP(nn.Module):
    """A small classifier on flattened inputs (scikit-learn's 8×8 digits)."""

    def __init__(self, inputs: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """A small CNN on 1×8×8 images (scikit-learn's digits): the CNN workload that runs offline."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(),
                                        nn.Linear(256, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda num_classes=10: MLP(num_classes=num_classes),
    "cnn_digits": lambda num_classes=10: DigitsCNN(num_classes),
    "resnet101": lambda num_classes=10: ResNet(Bottleneck, [3, 4, 23, 3], [64, 128, 256, 512],
                                               num_classes),
    "resnet20": lambda num_classes=10: ResNet(BasicBlock, [3, 3, 3], [16, 32, 64], num_classes),
    "vgg16": lambda num_classes=100: VGG(_VGG16, num_classes, 4096),
    "vgg_small": lambda num_classes=100: VGG(_VGG_SMALL, num_classes, 256),
    "lstm1500": lambda vocab=10000: LSTMLanguageModel(vocab, 1500, 2),
    "lstm650": lambda vocab=10000: LSTMLanguageModel(vocab, 650, 2, dropout=0.5),
    "lstm200": lambda vocab=10000: LSTMLanguageModel(vocab, 200, 2, dropout=0.2),
    "gpt4x256": lambda vocab=10000: GPTLanguageModel(vocab, 256, 4, heads=4, context=64),
}


def create_model(name: str, **kwargs) -> nn.Module:
    """A model by name; ``ValueError`` naming the valid ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def model_context(name: str) -> int | None:
    """The longest window a language model takes (None: any, as an LSTM)."""
    with torch.device("meta"):
        return getattr(create_model(name), "context", None)


def parameter_shapes(name: str) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every parameter, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = create_model(name)
    return [(n, p.shape) for n, p in model.named_parameters()]
