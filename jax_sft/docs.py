"""The README's lists that come from code, regenerated between their markers:

<!-- generated:families -->  the model-family registry (jax_sft/models/families/)
<!-- generated:datasets -->  NeMo RL's dataset names jax_sft reads (jax_sft/data/builtin.py)

python -m jax_sft.docs           # rewrites README.md's generated blocks
python -m jax_sft.docs --check   # exit 1 when they are out of date (tests/test_docs.py checks it)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from jax_sft.data.builtin import ALIASES, REGISTRY
from jax_sft.models import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def _datasets() -> str:
    names = ", ".join(f"`{name}`" for name in REGISTRY)
    old = ", ".join(f"`{old}` for `{new}`" for old, new in ALIASES.items())
    return f"Names (NeMo RL's registry, text only): {names}; older names: {old}."


BLOCKS: dict[str, Callable[[], str]] = {
    "families": registry.markdown_table,
    "datasets": _datasets,
}


def render(text: str) -> str:
    """`text` with every generated block replaced by its current content."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md has no <!-- generated:{name} --> ... <!-- /generated:{name} --> block")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jax_sft.docs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when the blocks are out of date; write nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md: generated blocks are out of date; run python -m jax_sft.docs", file=sys.stderr)
            raise SystemExit(1)
        return
    README.write_text(new)


if __name__ == "__main__":
    main()
