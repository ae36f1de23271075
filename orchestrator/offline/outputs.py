"""What the offline tools write and the rules for where: a safetensors file streamed one
tensor at a time, and output directories that are checked before any work and appear
whole or not at all.

Rules (the same for `grow expand`, `import-hf` and `export-hf`): the output may not be,
contain or lie inside an input; an existing non-empty output is refused unless the user
passes overwrite=true; everything is written under `.NAME.tmp-PID` beside the output,
fsynced and renamed into place (an older output is swapped out only then), and the
temporary directory is removed if anything fails.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from orchestrator.atomic import fsync_dir, fsync_file, replace_dir
from orchestrator.checkpoint.canonical import seal_and_publish
from orchestrator.checkpoint.stream import write_safetensors_stream  # noqa: F401 (the offline tools' writer)
from orchestrator.faults import failpoint


class OfflineError(ValueError):
    """Bad input to an offline tool; `field` names the key (or file) at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _related(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(out: Path, inputs: dict[str, Path], overwrite: bool) -> Path:
    """Refuse an output that would destroy an input or someone's files, before any work."""
    out = Path(out)
    for key, path in inputs.items():
        if _related(out, Path(path)):
            raise OfflineError("out", f"{out} is the same as, inside or around {key}={path}; "
                                      "an offline tool never writes over its input: choose another out=")
    if out.exists() and not out.is_dir():
        raise OfflineError("out", f"{out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OfflineError("out", f"{out} exists and is not empty; pass overwrite=true to replace it "
                                  "(everything in it is removed), or choose another out=")
    if out.parent.exists() and not out.parent.is_dir():
        raise OfflineError("out", f"{out.parent} is a file, not a directory")
    return out


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh `.NAME.tmp-PID` beside `out` to write into; removed if the body fails
    (the body publishes it on success, which renames it away)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, out: Path) -> Path:
    """fsync every file of `tmp` and rename it to `out`; an existing `out` is swapped out
    only once the new one is complete (as seal_and_publish does for checkpoints)."""
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    failpoint("offline.written")  # complete in the temp dir, not yet in place
    replace_dir(tmp, out)
    return out


def write_checkpoint_dir(out: Path, write_files: Callable[[Path], None], meta: dict,
                         before_publish: Callable[[Path, dict], dict] | None = None) -> Path:
    """A canonical checkpoint at `out` (no `latest` pointer: not a run directory).
    `before_publish(tmp, meta)` may inspect the written tensors and return the meta to
    write, or raise to publish nothing."""
    with staged_dir(out) as tmp:
        write_files(tmp)
        if before_publish is not None:
            meta = before_publish(tmp, meta)
        return seal_and_publish(tmp, Path(out), meta, point_latest=False)
