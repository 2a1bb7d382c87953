"""The PyTorch side of :class:`einattn.Attention`: one custom op,
``torch.ops.einattn.attention(program, tensors, scalars) -> list[Tensor]``.

``program`` names a compiled source in this module's registry, so one op serves every
``einattn.compile``. The op is opaque to ``torch.compile``: its fake implementation gives
the outputs' shapes (computed by the compiler from the inputs' shapes), so a compiled graph
holds it without a break. Its CUDA implementation compiles kernels for the tensors' shapes
(once per shape tuple), allocates outputs and scratch with PyTorch's allocator and launches
on PyTorch's current stream. ``Attention.__call__`` (:func:`call`) checks the tensors first
with plain tensor metadata, which ``torch.compile`` traces without leaving the graph.
"""

from __future__ import annotations

import importlib.util
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

_REGISTRY: Dict[str, Any] = {}
_COUNTER = itertools.count()
_OP: Optional[Any] = None
_CAPABILITY: Dict[int, Tuple[int, int]] = {}

BACKWARD_MESSAGE = (
    "einattn: the op does not call backward kernels yet (`einattn grad` derives them and "
    "`einattn check --grad` runs them), so gradients cannot flow through an einattn op; "
    "call it under torch.no_grad() or on tensors that do not require grad"
)


def register(attn) -> str:
    """Files `attn` under a fresh key and defines the op when PyTorch is installed."""
    key = f"{attn.name}#{next(_COUNTER)}"
    _REGISTRY[key] = attn
    if importlib.util.find_spec("torch") is not None:
        _define_op()
    return key


def _dtypes():
    import torch

    return {
        "bf16": torch.bfloat16,
        "f16": torch.float16,
        "f32": torch.float32,
        # Token arrays (document ids): 32-bit integers, read as unsigned by the kernels.
        "u32": torch.int32,
    }


def _define_op():
    global _OP
    if _OP is not None:
        return _OP
    import torch

    # The schema is written out: this module's annotations are strings, which PyTorch's
    # schema inference cannot read.
    @torch.library.custom_op(
        "einattn::attention",
        mutates_args=(),
        schema="(str program, Tensor[] tensors, float[] scalars) -> Tensor[]",
    )
    def attention(program, tensors, scalars):
        return _launch(_REGISTRY[program], tensors, scalars)

    @attention.register_fake
    def _(program, tensors, scalars):
        return _fake(_REGISTRY[program], tensors)

    def backward(ctx, grads):
        raise NotImplementedError(BACKWARD_MESSAGE)

    def setup_context(ctx, inputs, output):
        pass

    attention.register_autograd(backward, setup_context=setup_context)
    _OP = attention
    return attention


def _sequence_dtype(attn, tensors: Sequence[Any]):
    """The dtype of the tensors the cascade declares as bf16 or f16 (they share one)."""
    for spec, t in zip(attn.signature["tensors"], tensors):
        if spec["dtype"] in ("bf16", "f16"):
            return t.dtype
    return None


def _output_dtype(attn, declared: Optional[str], sequence):
    import torch

    if declared in ("bf16", "f16") and sequence is not None:
        return sequence
    return _dtypes().get(declared or "f32", torch.float32)


def _fake(attn, tensors: Sequence[Any]):
    shapes = tuple(tuple(int(d) for d in t.shape) for t in tensors)
    sequence = _sequence_dtype(attn, tensors)
    declared = {o["name"]: o["dtype"] for o in attn.signature["outputs"]}
    return [
        tensors[0].new_empty(shape, dtype=_output_dtype(attn, declared.get(name), sequence))
        for name, shape in attn._shapes(shapes)
    ]


def _capability(index: int) -> Tuple[int, int]:
    found = _CAPABILITY.get(index)
    if found is None:
        import torch

        found = tuple(torch.cuda.get_device_capability(index))
        _CAPABILITY[index] = found
    return found


def _launch(attn, tensors: Sequence[Any], scalars: Sequence[float]):
    import torch

    # The op can be called directly: the checks of `call` again, cheaply.
    _check_tensors(attn, tensors)
    device = tensors[0].device
    index = device.index if device.index is not None else torch.cuda.current_device()
    sequence = _sequence_dtype(attn, tensors)
    elem = "f16" if sequence == torch.float16 else "bf16"
    shapes = tuple(tuple(t.shape) for t in tensors)
    kernels = attn._kernels_for(index, elem, shapes, _capability(index))
    dtypes = _dtypes()
    for (name, dtype), t in zip(kernels.inputs, tensors):
        want = dtypes.get(dtype)
        if want is not None and t.dtype != want:
            raise TypeError(f"`{name}` is {t.dtype}; the kernel reads {want}")
    outputs = [
        torch.empty(shape, dtype=dtypes[dtype], device=device)
        for _, shape, dtype in kernels.outputs
    ]
    # Allocated on the current stream and freed to it: PyTorch's allocator reuses the
    # memory only for work ordered after these kernels.
    scratch = [
        torch.zeros(nbytes, dtype=torch.uint8, device=device) for _, nbytes in kernels.scratch
    ]
    stream = torch.cuda.current_stream(device).cuda_stream
    kernels.launch(
        index,
        stream,
        [t.data_ptr() for t in tensors],
        [o.data_ptr() for o in outputs],
        [s.data_ptr() for s in scratch],
        [float(s) for s in scalars],
    )
    return outputs


def _check_tensors(attn, tensors: Sequence[Any]) -> None:
    import torch

    specs = attn.signature["tensors"]
    if len(tensors) != len(specs):
        names = ", ".join(s["name"] for s in specs)
        raise TypeError(f"{attn.name} takes {len(specs)} tensors ({names}), got {len(tensors)}")
    first = None
    sequence = None
    for spec, t in zip(specs, tensors):
        name = spec["name"]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, not {type(t).__name__}")
        # Meta tensors only carry shapes: the op gives meta outputs (its fake implementation).
        if t.device.type not in ("cuda", "meta"):
            raise ValueError(
                f"`{name}` is on {t.device}; einattn kernels run on CUDA tensors "
                "(einattn.run evaluates a source on the CPU)"
            )
        if first is None:
            first = t
        elif t.device != first.device:
            raise ValueError(
                f"`{name}` is on {t.device} but `{specs[0]['name']}` on {first.device}"
            )
        if t.dim() != len(spec["dims"]):
            dims = ", ".join(str(d) for d in spec["dims"])
            raise ValueError(
                f"`{name}` has {t.dim()} dimensions {tuple(t.shape)}; "
                f"{attn.name} declares {name}[{dims}]"
            )
        declared = spec["dtype"]
        if declared in ("bf16", "f16"):
            if t.dtype not in (torch.bfloat16, torch.float16):
                raise TypeError(
                    f"`{name}` is {t.dtype}; einattn kernels take bfloat16 or float16 here"
                )
            if sequence is None:
                sequence = (name, t.dtype)
            elif t.dtype != sequence[1]:
                raise TypeError(f"`{name}` is {t.dtype} but `{sequence[0]}` is {sequence[1]}")
        elif declared == "f32" and t.dtype != torch.float32:
            raise TypeError(f"`{name}` is {t.dtype}; {attn.name} declares it f32 (torch.float32)")
        if not t.is_contiguous():
            raise ValueError(
                f"`{name}` is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                "einattn kernels read row-major tensors: pass `.contiguous()`"
            )


def _arrange(attn, tensors: Sequence[Any], kwargs: Dict[str, Any]):
    """The tensors in declaration order and the scalars, from positional and keyword
    arguments; a parameter array with a default left out is filled with it."""
    import torch

    specs = attn.signature["tensors"]
    if len(tensors) > len(specs):
        names = ", ".join(s["name"] for s in specs)
        raise TypeError(
            f"{attn.name} takes at most {len(specs)} tensors ({names}), got {len(tensors)}"
        )
    given: List[Any] = list(tensors) + [None] * (len(specs) - len(tensors))
    scalars: Dict[str, Any] = {}
    for key, value in kwargs.items():
        index = next((i for i, s in enumerate(specs) if s["name"] == key), None)
        if index is not None:
            if given[index] is not None:
                raise TypeError(f"`{key}` given twice")
            given[index] = value
        elif key in attn.scalar_defaults:
            scalars[key] = value
        else:
            known = [s["name"] for s in specs] + list(attn.scalar_defaults)
            raise TypeError(f"{attn.name} has no tensor or scalar `{key}` (it has: {', '.join(known)})")
    missing = [i for i, t in enumerate(given) if t is None]
    if missing:
        present = next((t for t in given if t is not None), None)
        for i in missing:
            spec = specs[i]
            if spec["default"] is None or present is None:
                raise TypeError(f"{attn.name} needs the tensor `{spec['name']}`")
            shape = _shape_from_symbols(attn, spec, given)
            given[i] = torch.full(
                shape, float(spec["default"]), dtype=torch.float32, device=present.device
            )
    values = []
    for name, default in attn.scalar_defaults.items():
        value = scalars.get(name, default)
        if value is None:
            raise TypeError(f"{attn.name} needs the scalar `{name}` (it has no default)")
        values.append(float(value))
    return given, values


def _shape_from_symbols(attn, spec, given) -> List[int]:
    """A parameter array's shape from the sizes the other tensors give."""
    sizes: Dict[str, int] = {}
    for s, t in zip(attn.signature["tensors"], given):
        if t is None:
            continue
        for d, size in zip(s["dims"], t.shape):
            if isinstance(d, str):
                sizes.setdefault(d, int(size))
    defines = dict(attn.signature["defines"])
    shape = []
    for d in spec["dims"]:
        if isinstance(d, int):
            shape.append(d)
        elif d in sizes:
            shape.append(sizes[d])
        elif d in defines:
            shape.append(int(defines[d]))
        else:
            raise TypeError(f"{attn.name} needs the tensor `{spec['name']}` (its size {d} is not known)")
    return shape


def call(attn, tensors: Sequence[Any], kwargs: Dict[str, Any]):
    """`Attention.__call__`: checks, then the op."""
    op = _define_op()
    arranged, scalars = _arrange(attn, tensors, kwargs)
    _check_tensors(attn, arranged)
    outputs = op(attn._key, arranged, scalars)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
