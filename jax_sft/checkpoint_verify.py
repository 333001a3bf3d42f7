"""Checking a committed checkpoint item's files against what its own metadata lists, so that a
step_N that lost a file after it was saved (a deleted weight file, a copy that stopped halfway) is
found before it is resumed, exported or sampled from (`jax_sft.checkpoint.incomplete_reason`).

- Array items (params/, opt_state/: Orbax's OCDBT format): the manifest names the root of a
  b-tree whose nodes and values live in data files (`d/<hash>`, `ocdbt.process_<i>/d/<hash>`),
  each reference a (file, offset, length). `ocdbt_problem` reads the manifest and every b-tree node
  (a few KB each; no array data is read) and checks that each referenced file is there and holds
  the bytes referenced.
- Files items (data/, extra/: `jax_sft.checkpoint.FilesHandler`): every process writes, beside
  its files, a listing `_FILES.process_<i>-of-<n>.json` ({name: bytes}); `listed_files_problem`
  checks that each process's listing is there and each listed file has its size. Items saved
  before listings were written have none and are not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

LISTING = "_FILES.process_{process}-of-{count}.json"
_LISTING_GLOB = "_FILES.process_*-of-*.json"
_LISTING_NAME = re.compile(r"_FILES\.process_(\d+)-of-(\d+)\.json")
# An OCDBT data reference: kind:base_path:relative_path:offset:length (tensorstore's dump format).
_LOCATION = re.compile(r"(btreenode|value|versionnode):([^:]*):([^:]+):(\d+):(\d+)")


def listing(files: Mapping[str, bytes], process: int, count: int) -> tuple[str, bytes]:
    """(file name, contents) of the listing of the files one process writes into a files item."""
    sizes = {name: len(data) for name, data in files.items()}
    return LISTING.format(process=process, count=count), json.dumps(sizes, sort_keys=True).encode()


def listed_files_problem(item: Path) -> str | None:
    """What is missing from a files item (data/, extra/), per its listings; None when all is there."""
    listings = sorted(item.glob(_LISTING_GLOB))
    if not listings:
        return None  # saved before listings were written: nothing to check against
    count = int(_LISTING_NAME.fullmatch(listings[0].name).group(2))
    for process in range(count):
        name = LISTING.format(process=process, count=count)
        if not (item / name).is_file():
            return f"{item.name}/{name} is missing"
        try:
            sizes = json.loads((item / name).read_text())
        except ValueError:
            return f"{item.name}/{name} is unreadable"
        for file, size in sizes.items():
            path = item / file
            if not path.is_file():
                return f"{item.name}/{file} is missing"
            if path.stat().st_size != size:
                return f"{item.name}/{file} has {path.stat().st_size} bytes, {size} were saved"
    return None


def _locations(tree: Any) -> Iterator[re.Match]:
    """Every OCDBT data reference in a dumped manifest or node (nested dicts, lists, strings)."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _locations(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _locations(value)
    elif isinstance(tree, str) and (match := _LOCATION.fullmatch(tree)):
        yield match


def ocdbt_problem(item: Path) -> str | None:
    """What is missing from an OCDBT array item: the first data file that its manifest, a
    process's manifest (ocdbt.process_<i>/) or one of their b-trees references and that is absent
    or shorter than the bytes referenced; None when all is there."""
    for root in [item, *sorted(item.glob("ocdbt.process_*"))]:
        problem = _tree_problem(item, root)
        if problem:
            return problem
    return None


def _tree_problem(item: Path, root: Path) -> str | None:
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "file", "path": f"{root}/"}).result()
    name = lambda path: f"{item.name}/{path.relative_to(item)}"  # noqa: E731
    try:
        tree = ts.ocdbt.dump(kv).result()
    except ValueError as e:
        return f"{name(root / 'manifest.ocdbt')} is unreadable ({str(e).splitlines()[0][:200]})"
    pending, seen = list(_locations(tree)), set()
    while pending:
        match = pending.pop()
        kind, base, relative, offset, length = match.groups()
        path = root / base / relative
        if not path.is_file():
            return f"{name(path)} is missing"
        if path.stat().st_size < int(offset) + int(length):
            return f"{name(path)} is cut short ({path.stat().st_size} bytes)"
        if kind == "btreenode" and match.group(0) not in seen:
            seen.add(match.group(0))
            try:
                node = ts.ocdbt.dump(kv, match.group(0)).result()
            except ValueError as e:
                return f"{name(path)} is unreadable ({str(e).splitlines()[0][:200]})"
            pending.extend(_locations(node))
    return None
