"""`grow grow` (alias `grow expand`): grow a canonical checkpoint on disk, tensor by tensor.

    grow grow ckpt=SRC out=DST growth=clone hidden=256 ffn=1024 heads=8 [kv_heads=..]
              [layers=..] [layer_insert=interleave] [init=..] [moments=..] [ramp_steps=..] [seed=0]

Old tensors are read one at a time through safetensors' memory map and each grown tensor
is written as soon as it is built, into a safetensors file whose header is computed up
front from the target shape, so memory stays at a few tensors whatever the checkpoint's
size. The result is an ordinary canonical checkpoint (model, moments, meta, manifest)
that `load_checkpoint` verifies and a stage can start from; with the same seed it equals
what `growth_ops.<op>.grow` gives in memory.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from growth_ops import GrowthError, MaskState, ModelSpec, get_operator, iter_grown, iter_moments
from growth_ops.common import all_axes
from growth_ops.spec import axis_size, parameter_axes

from orchestrator.checkpoint.canonical import MOMENTS, seal_and_publish
from orchestrator.exits import EXIT_CONFIG, fail

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class CommandError(RuntimeError):
    pass


def parse_args(args: list[str], required: tuple[str, ...], allowed: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for a in args:
        if "=" not in a:
            raise CommandError(f"expected key=value, got {a!r}; allowed keys: {', '.join(allowed)}")
        k, v = a.split("=", 1)
        if k not in allowed:
            raise CommandError(f"{k}: unknown key; allowed: {', '.join(allowed)}")
        out[k] = v
    missing = [k for k in required if k not in out]
    if missing:
        raise CommandError(f"{missing[0]}: required")
    return out


# -- streaming safetensors -----------------------------------------------------------------

def write_safetensors_stream(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file whose tensors arrive one by one, in `layout` order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in layout:
        n = torch.tensor([], dtype=dtype).element_size()
        for s in shape:
            n *= s
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    expected = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors:
            want, dtype, shape = next(expected)
            if name != want or tuple(t.shape) != tuple(shape):
                raise CommandError(f"internal: got {name} {tuple(t.shape)}, expected {want} {shape}")
            t = t.detach().to(dtype).contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint_dir(out: Path, write_files: Callable[[Path], None], meta: dict) -> Path:
    """A canonical checkpoint directory at `out`, written under a temporary name and
    renamed (no `latest` pointer: this is not a run directory)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp)
    return seal_and_publish(tmp, out, meta, point_latest=False)


class LazyTensors:
    """Tensors of a safetensors file, read one at a time (None when absent)."""

    def __init__(self, path: Path, prefix: str = ""):
        from safetensors import safe_open
        self._f = safe_open(str(path), framework="pt") if Path(path).exists() else None
        self._keys = set(self._f.keys()) if self._f is not None else set()
        self.prefix = prefix

    def __call__(self, name: str) -> torch.Tensor | None:
        key = self.prefix + name
        return self._f.get_tensor(key) if key in self._keys else None

    def dtype(self) -> torch.dtype:
        """The file's dtype (of its first tensor); float32 for an empty file."""
        for k in sorted(self._keys):
            return DTYPE_BY_NAME[self._f.get_slice(k).get_dtype()]
        return torch.float32

    def __len__(self) -> int:
        return len(self._keys)


DTYPE_BY_NAME = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


# -- growing a checkpoint ------------------------------------------------------------------

def target_spec(old: ModelSpec, opts: dict[str, str]) -> ModelSpec:
    shape = {k: int(opts[k]) for k in ("layers", "hidden", "ffn", "heads", "kv_heads") if k in opts}
    if "heads" in shape and "kv_heads" not in shape:
        shape["kv_heads"] = shape["heads"] if old.kv_heads == old.heads else old.kv_heads
    if "hidden" in shape and "heads" not in shape and old.hidden == old.q_dim:
        shape["heads"] = shape["hidden"] // old.head_dim  # head_dim stays fixed
        shape.setdefault("kv_heads", shape["heads"] if old.kv_heads == old.heads else old.kv_heads)
    return old.with_shape(**shape)


def grow_checkpoint(src: Path, out: Path, operator: str, new_shape: dict[str, str], *, ramp_steps: int = 0,
                    layer_insert: str = "append", init: str | None = None, moments: str | None = None,
                    seed: int = 0) -> dict:
    """Grow the checkpoint at `src` into `out`; returns a small report."""
    src, out = Path(src), Path(out)
    meta = json.loads((src / "meta.json").read_text())
    old = ModelSpec.from_dict(meta["spec"])
    new = target_spec(old, new_shape)
    masks_now = MaskState.from_dict(meta.get("masks"))
    if masks_now is not None and not masks_now.done:
        raise GrowthError("masks", f"the checkpoint is mid-ramp ({masks_now.steps_done}/{masks_now.ramp_steps} "
                                   "steps); train until the masks reach 1 before growing again")
    op = get_operator(operator)
    op.check_growth(old, new, layer_insert, init, moments)
    plan = op.plan_growth(old, new, layer_insert, init, moments)
    model_in = LazyTensors(src / "model.safetensors")
    dtype = model_in.dtype()
    generator = torch.Generator().manual_seed(seed)
    model_layout = [(n, dtype, tuple(axis_size(new, k) for k in kinds)) for n, kinds in all_axes(new).items()]
    has_moments = (src / "optimizer.safetensors").exists() and len(LazyTensors(src / "optimizer.safetensors")) > 0
    param_layout = [(n, tuple(axis_size(new, k) for k in kinds)) for n, kinds in parameter_axes(new).items()]

    def moment_stream(optim: LazyTensors) -> Iterator[tuple[str, torch.Tensor]]:
        for kind in MOMENTS:
            optim.prefix = f"{kind}."
            for name, t in iter_moments(plan, optim, kind):
                yield f"{kind}.{name}", t

    def write_files(tmp: Path) -> None:
        write_safetensors_stream(tmp / "model.safetensors", model_layout,
                                 iter_grown(plan, op.fill, model_in, generator, op.finish))
        layout = [(f"{kind}.{n}", torch.float32, s) for kind in MOMENTS for n, s in param_layout] if has_moments else []
        stream = moment_stream(LazyTensors(src / "optimizer.safetensors")) if has_moments else iter(())
        write_safetensors_stream(tmp / "optimizer.safetensors", layout, stream)

    masks = None
    if getattr(op, "USES_MASKS", False):
        from growth_ops.msg import masks_for
        masks = masks_for(plan, ramp_steps).to_dict()
    record = {"operator": operator, "from_spec": old.to_dict(), "layer_insert": layer_insert,
              "init": plan.init, "moments": plan.moments_rule, "seed": seed,
              "preserves_function": op.PRESERVES_FUNCTION, "source": str(src)}
    new_meta = {**{k: v for k, v in meta.items() if k != "format"}, "spec": new.to_dict(), "masks": masks,
                "offline_growth": record}
    write_checkpoint_dir(out, write_files, new_meta)
    return {"from": old.to_dict(), "to": new.to_dict(), "operator": operator, "out": str(out)}


GROW_KEYS = ("ckpt", "out", "growth", "layers", "hidden", "ffn", "heads", "kv_heads", "ramp_steps",
             "layer_insert", "init", "moments", "seed")


def grow_command(args: list[str]) -> int:
    try:
        opts = parse_args(args, ("ckpt", "out", "growth"), GROW_KEYS)
        report = grow_checkpoint(Path(opts["ckpt"]), Path(opts["out"]), opts["growth"], opts,
                                 ramp_steps=int(opts.get("ramp_steps", 0)),
                                 layer_insert=opts.get("layer_insert", "append"), init=opts.get("init"),
                                 moments=opts.get("moments"), seed=int(opts.get("seed", 0)))
    except (CommandError, GrowthError, ValueError, FileNotFoundError) as e:
        return fail(EXIT_CONFIG, str(e))
    a, b = report["from"], report["to"]
    shape = lambda s: f"layers={s['layers']} hidden={s['hidden']} ffn={s['ffn']} heads={s['heads']}/{s['kv_heads']}"  # noqa: E731
    print(f"grew {shape(a)} -> {shape(b)} with {report['operator']}: {report['out']}")
    return 0
