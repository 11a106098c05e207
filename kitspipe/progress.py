"""Progress bars that stay out of logs: shown only on a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    show = enabled and sys.stderr.isatty()
    return iter(tqdm(items, total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True))
