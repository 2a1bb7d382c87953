"""einattn: attention algorithms written as extended-Einsum cascades (``.ein`` files),
compiled in process to GPU kernels and called on PyTorch tensors.

    import einattn
    attn = einattn.compile("examples/attention_causal.ein", D=128)
    o = attn(q, k, v)            # torch CUDA tensors, bf16 or f16, [B, N, H, D]

- :func:`compile` reads and compiles a source (errors show here, with file:line:col);
  calling the result runs its kernels on PyTorch's current CUDA stream. Sizes come from the
  tensors' shapes: each distinct shape tuple is compiled once (in milliseconds) and cached.
  The call is the custom op ``torch.ops.einattn.attention``, with a fake implementation, so
  it works under ``torch.compile`` without graph breaks. The op does not call backward
  kernels yet (``einattn check --grad`` runs them): ``backward()`` through it raises.
- :func:`analyze` returns the FuseMax analysis of a source as a dict.
- :func:`run` evaluates a source with the f64 reference interpreter on NumPy arrays.

Only :meth:`Attention.__call__` needs PyTorch; the rest needs NumPy alone.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import _native
from ._native import CompileError

__all__ = ["compile", "analyze", "run", "Attention", "CompileError"]
__version__ = _native.__version__


def _defines(defines: Mapping[str, Any]) -> List[Tuple[str, int]]:
    out = []
    for name, value in defines.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise TypeError(f"size {name}={value!r}: sizes are non-negative integers")
        out.append((name, int(value)))
    return out


def _path(path: "os.PathLike[str] | str") -> str:
    return os.fspath(path)


class Attention:
    """A compiled ``.ein`` source, callable on PyTorch CUDA tensors.

    ``attn(*tensors, **scalars)`` takes the cascade's inputs and parameter arrays in the
    order the source declares them (by position or by name); a parameter array with a
    default may be left out. Scalar parameters are keywords (``scale=0.1``), their defaults
    the source's. Returns the output tensor (a tuple when the cascade has several).
    """

    def __init__(self, program: "_native.Program"):
        self._program = program
        sig = json.loads(program.signature_json())
        self.name: str = sig["name"]
        self.path: str = sig["path"]
        self.signature: Dict[str, Any] = sig
        self.tensor_names: List[str] = [t["name"] for t in sig["tensors"]]
        self.scalar_defaults: Dict[str, Optional[float]] = {
            s["name"]: s["default"] for s in sig["scalars"]
        }
        self.output_names: List[str] = [t["name"] for t in sig["outputs"]]
        # Kernels by (device, dtype, shapes); output shapes by shapes.
        self._kernels: Dict[Tuple[Any, ...], "_native.Kernels"] = {}
        self._output_shapes: Dict[Tuple[Any, ...], List[Tuple[str, List[int]]]] = {}
        from . import _torch_op

        self._key = _torch_op.register(self)

    def __repr__(self) -> str:
        tensors = ", ".join(self.tensor_names)
        scalars = "".join(f", {n}={d}" for n, d in self.scalar_defaults.items())
        return f"<einattn.Attention {self.name}({tensors}{scalars}) from {self.path}>"

    def sizes_for(self, *shapes) -> Dict[str, int]:
        """The size bindings tensors of these shapes give (no GPU needed)."""
        return dict(self._program.sizes_for([list(s) for s in shapes]))

    def output_shapes(self, *shapes) -> Dict[str, Tuple[int, ...]]:
        """Each output's shape for tensors of these shapes (no GPU needed)."""
        return {n: tuple(s) for n, s in self._shapes(tuple(tuple(s) for s in shapes))}

    def kernels(self, *shapes, dtype: str = "bf16", capability: Tuple[int, int] = (9, 0)):
        """The compiled kernels for tensors of these shapes: their manifest (launch
        contracts) and PTX, without a GPU."""
        return self._program.kernels([list(s) for s in shapes], dtype, capability)

    def __call__(self, *tensors, **kwargs):
        from . import _torch_op

        return _torch_op.call(self, tensors, kwargs)

    # What the custom op's implementations use (see _torch_op).
    def _shapes(self, shapes: Tuple[Tuple[int, ...], ...]):
        found = self._output_shapes.get(shapes)
        if found is None:
            found = self._program.output_shapes([list(s) for s in shapes])
            self._output_shapes[shapes] = found
        return found

    def _kernels_for(self, device_index: int, elem: str, shapes, capability):
        key = (device_index, elem, shapes)
        found = self._kernels.get(key)
        if found is None:
            found = self._program.kernels([list(s) for s in shapes], elem, capability)
            self._kernels[key] = found
        return found


def compile(
    path: "os.PathLike[str] | str",
    *,
    strategy: Optional[str] = None,
    chunk_tokens: Optional[int] = None,
    optimize: bool = False,
    **defines: int,
) -> Attention:
    """Compiles the ``.ein`` source at ``path``; ``defines`` bind size symbols (``D=128``)
    that the tensors' shapes do not give. Raises :class:`CompileError` (with file:line:col)
    when the source does not compile, ``OSError`` when it cannot be read."""
    program = _native.Program(
        _path(path),
        _defines(defines),
        strategy=strategy,
        chunk_tokens=chunk_tokens,
        optimize=optimize,
    )
    if program.warnings:
        warnings.warn(program.warnings.rstrip(), stacklevel=2)
    return Attention(program)


def analyze(path: "os.PathLike[str] | str", **defines: int) -> Dict[str, Any]:
    """The FuseMax analysis of a source (passes over each rank, live buffers, FLOPs,
    bytes, roofline), as ``einattn analyze --format json`` reports it."""
    return json.loads(_native.analyze_json(_path(path), _defines(defines)))


def run(
    path: "os.PathLike[str] | str",
    inputs: Optional[Mapping[str, Any]] = None,
    *,
    seed: int = 0,
    **defines: int,
) -> Dict[str, np.ndarray]:
    """Evaluates a source with the f64 reference interpreter. ``inputs`` maps input or
    parameter names to arrays (anything ``np.asarray`` takes); the others are drawn from
    ``seed`` as ``einattn run`` draws them. Returns every input, parameter and output as a
    float64 array."""
    given = []
    for name, value in (inputs or {}).items():
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float64))
        given.append((name, list(array.shape), array.tobytes()))
    out = _native.run(_path(path), _defines(defines), given, int(seed))
    return {
        name: np.frombuffer(raw, dtype=np.float64).reshape(shape).copy()
        for name, shape, raw in out
    }
