"""Which tensors to compress at all.

Compressing a small tensor (a bias, a normalisation scale) saves a few bytes but costs a
kernel, an index overhead larger than the values at low CFs, and error-feedback state; DGC and
PyTorch's PowerSGD hook leave such tensors uncompressed too. The rule: a tensor with fewer
than ``min_compress_numel`` elements is exchanged dense, unless a name pattern says otherwise.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping

from ..validation import check_number

#: tensors with fewer elements are exchanged uncompressed by default (biases, norm scales)
DEFAULT_MIN_COMPRESS_NUMEL = 1024


def uncompressed_tensors(sizes: Iterable[tuple[str, int]], min_compress_numel: int,
                         compress_patterns: Mapping[str, bool] | None = None) -> frozenset[str]:
    """Names of the tensors to exchange dense (no compression, no residual).

    Arguments:
        sizes: ``(name, numel)`` of every tensor that may be compressed.
        min_compress_numel: tensors with fewer elements are not compressed (0: compress all).
        compress_patterns: ``fnmatch`` patterns of names (``"*.bias"``, ``"decoder.*"``) to
            ``True`` (always compress, whatever the size) or ``False`` (never compress); the
            first pattern that matches a name decides, names no pattern matches follow
            ``min_compress_numel``. A pattern that matches no name is a ``ValueError`` (a typo
            would otherwise silently change nothing).
    """
    min_compress_numel = check_number("min_compress_numel", min_compress_numel, 0, integer=True)
    if compress_patterns is not None and not isinstance(compress_patterns, Mapping):
        raise ValueError("compress_patterns must map name patterns to True/False, e.g. "
                         f"{{'*.bias': False}}, got {compress_patterns!r}")
    patterns = dict(compress_patterns or {})
    for pattern, compress in patterns.items():
        if not isinstance(pattern, str) or not isinstance(compress, bool):
            raise ValueError("compress_patterns must map name patterns (str) to True (compress) "
                             f"or False (send dense), got {pattern!r}: {compress!r}")
    sizes = list(sizes)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n, _ in sizes)]
    if unmatched:
        examples = ", ".join(n for n, _ in sizes[:4])
        raise ValueError(f"compress_patterns {unmatched} match no parameter name "
                         f"(names look like: {examples})")
    dense = set()
    for name, numel in sizes:
        rule = next((c for p, c in patterns.items() if fnmatch.fnmatchcase(name, p)), None)
        if rule is False or (rule is None and numel < min_compress_numel):
            dense.add(name)
    return frozenset(dense)
