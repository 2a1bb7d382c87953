//! `einattn._native`: the compiler and the launcher behind the `einattn` Python package.
//! The Python side (`python/einattn/`) checks tensors and talks to PyTorch; this module
//! compiles sources in process and launches kernels on the stream PyTorch names. Structured
//! results travel as JSON text, arrays as bytes: the Python side owns their types.

mod launch;
mod program;

use program::{Failure, Options, Program};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pyo3::create_exception!(
    _native,
    CompileError,
    PyValueError,
    "A `.ein` source that does not compile: the message is the located diagnostics (file:line:col, the line, a caret)."
);

fn py_error(f: Failure) -> PyErr {
    match f {
        Failure::Compile(m) => CompileError::new_err(m),
        Failure::Value(m) => PyValueError::new_err(m),
        Failure::Io(m) => PyOSError::new_err(m),
    }
}

/// A compiled `.ein` source: its signature, and kernels for the sizes of given tensors.
#[pyclass(frozen, name = "Program", module = "einattn._native")]
struct PyProgram(Program);

#[pymethods]
impl PyProgram {
    #[new]
    #[pyo3(signature = (path, defines, strategy=None, chunk_tokens=None, optimize=false))]
    fn new(
        py: Python<'_>,
        path: String,
        defines: Vec<(String, u64)>,
        strategy: Option<String>,
        chunk_tokens: Option<u64>,
        optimize: bool,
    ) -> PyResult<Self> {
        let options = Options {
            strategy,
            chunk_tokens,
            optimize,
        };
        py.detach(|| Program::open(&path, defines, options))
            .map(PyProgram)
            .map_err(py_error)
    }

    /// The cascade's name.
    #[getter]
    fn name(&self) -> String {
        self.0.name().to_string()
    }

    /// Warnings of the front end, rendered (empty when none).
    #[getter]
    fn warnings(&self) -> String {
        self.0.warnings.clone()
    }

    /// Tensors (with each dimension's size symbol or fixed extent), scalars and outputs, as
    /// JSON.
    fn signature_json(&self) -> String {
        self.0.signature_json()
    }

    /// The size bindings the shapes of the caller's tensors give.
    fn sizes_for(&self, shapes: Vec<Vec<u64>>) -> PyResult<Vec<(String, u64)>> {
        self.0.sizes_for(&shapes).map_err(py_error)
    }

    /// `[(name, shape)]` of the outputs for tensors of `shapes`.
    fn output_shapes(
        &self,
        py: Python<'_>,
        shapes: Vec<Vec<u64>>,
    ) -> PyResult<Vec<(String, Vec<u64>)>> {
        py.detach(|| self.0.output_shapes(&shapes))
            .map_err(py_error)
    }

    /// Kernels for tensors of `shapes`, sequence tensors stored as `elem` (`bf16`, `f16`),
    /// for a GPU of compute capability `capability` (`(9, 0)` gets sm_90a, others sm_80).
    fn kernels(
        &self,
        py: Python<'_>,
        shapes: Vec<Vec<u64>>,
        elem: String,
        capability: (u32, u32),
    ) -> PyResult<PyKernels> {
        let target = if capability == (9, 0) {
            einattn_backends::Target::Sm90a
        } else {
            einattn_backends::Target::Sm80
        };
        if capability.0 < 8 {
            return Err(PyValueError::new_err(format!(
                "einattn kernels need compute capability 8.0 or newer (this GPU: {}.{})",
                capability.0, capability.1
            )));
        }
        py.detach(|| self.0.kernels_for(&shapes, &elem, target))
            .map(PyKernels)
            .map_err(py_error)
    }
}

/// The kernels of one compile, ready to launch.
#[pyclass(frozen, name = "Kernels", module = "einattn._native")]
struct PyKernels(program::Kernels);

#[pymethods]
impl PyKernels {
    /// `[(name, shape, dtype)]` of the outputs to allocate, in launch order.
    #[getter]
    fn outputs(&self) -> Vec<(String, Vec<u64>, String)> {
        self.0
            .outputs
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), d.name().to_string()))
            .collect()
    }

    /// `[(name, dtype)]` of the tensors the caller passes, in order.
    #[getter]
    fn inputs(&self) -> Vec<(String, String)> {
        self.0
            .inputs
            .iter()
            .map(|n| {
                let dtype = self
                    .0
                    .manifest
                    .kernels
                    .iter()
                    .find_map(|k| k.tensor(n))
                    .map_or("unused", |t| t.dtype.name());
                (n.clone(), dtype.to_string())
            })
            .collect()
    }

    /// `[(name, bytes)]` of the scratch arrays to allocate (zeroed), in order.
    #[getter]
    fn scratch(&self) -> Vec<(String, u64)> {
        self.0.scratch.clone()
    }

    /// The size bindings of the compile.
    #[getter]
    fn sizes(&self) -> Vec<(String, u64)> {
        self.0.sizes.clone()
    }

    /// The manifest (launch contracts), as `einattn compile -o` writes it.
    fn manifest_json(&self) -> String {
        self.0.manifest.to_json()
    }

    /// The PTX of each kernel, by entry.
    fn ptx(&self) -> Vec<(String, String)> {
        self.0
            .ptx
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Enqueues the kernels on CUDA stream `stream` of device `device` (a `CUstream` as an
    /// integer, PyTorch's `cuda_stream`). Addresses are of tensors the caller allocated on
    /// that device and checked against this compile's shapes and dtypes.
    #[pyo3(signature = (device, stream, inputs, outputs, scratch, scalars))]
    #[allow(clippy::too_many_arguments)] // the Python call's arguments, one by one
    fn launch(
        &self,
        py: Python<'_>,
        device: usize,
        stream: usize,
        inputs: Vec<u64>,
        outputs: Vec<u64>,
        scratch: Vec<u64>,
        scalars: Vec<f64>,
    ) -> PyResult<()> {
        let call = launch::Call {
            device,
            stream,
            inputs: &inputs,
            outputs: &outputs,
            scratch: &scratch,
            scalars: &scalars,
        };
        py.detach(|| launch::launch(&self.0, &call))
            .map_err(PyRuntimeError::new_err)
    }
}

/// The FuseMax analysis of a source, as JSON.
#[pyfunction]
fn analyze_json(py: Python<'_>, path: String, defines: Vec<(String, u64)>) -> PyResult<String> {
    py.detach(|| program::analyze_json(&path, &defines))
        .map_err(py_error)
}

/// A tensor crossing to or from Python: name, shape, f64 values as native-endian bytes.
type ArrayBytes<'py> = (String, Vec<usize>, Bound<'py, PyBytes>);

/// The reference interpreter: `inputs` as `(name, shape, f64 bytes)`; returns every input,
/// parameter and output the same way.
#[pyfunction]
fn run<'py>(
    py: Python<'py>,
    path: String,
    defines: Vec<(String, u64)>,
    inputs: Vec<ArrayBytes<'py>>,
    seed: u64,
) -> PyResult<Vec<ArrayBytes<'py>>> {
    let mut given = Vec::new();
    for (name, shape, bytes) in inputs {
        let raw = bytes.as_bytes();
        let bytes_wanted = shape
            .iter()
            .try_fold(8usize, |bytes, &d| bytes.checked_mul(d));
        if bytes_wanted != Some(raw.len()) {
            return Err(PyValueError::new_err(format!(
                "`{name}`: {} bytes for shape {shape:?} of f64",
                raw.len()
            )));
        }
        let values = raw
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_ne_bytes(b)
            })
            .collect();
        given.push((name, shape, values));
    }
    let out = py
        .detach(|| program::run(&path, &defines, given, seed))
        .map_err(py_error)?;
    Ok(out
        .into_iter()
        .map(|(name, shape, values)| {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
            (name, shape, PyBytes::new(py, &bytes))
        })
        .collect())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProgram>()?;
    m.add_class::<PyKernels>()?;
    m.add_function(wrap_pyfunction!(analyze_json, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add("CompileError", m.py().get_type::<CompileError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
