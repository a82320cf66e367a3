"""gravac-train's parser for sphinx-argparse, its help strings escaped for reST.

The help strings are plain text for a terminal (``'*.bias=false'``); sphinx-argparse reads
them as reST, where ``*`` opens emphasis and ``|x|`` is a substitution."""
from __future__ import annotations

import argparse
import re

from horovod_gravac.app.train import build_parser

_MARKUP = re.compile(r"([\\*`|_])")


def parser() -> argparse.ArgumentParser:
    p = build_parser()
    for action in p._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = _MARKUP.sub(r"\\\1", action.help)
    return p
