//! `.npy` input and output, so values move between einattn (`run`, `check --input`) and NumPy or PyTorch.

use einattn_ir::interp::TensorData;
use npyz::WriterBuilder;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub fn write(path: &Path, data: &TensorData) -> std::io::Result<()> {
    let shape: Vec<u64> = data.shape.iter().map(|&d| d as u64).collect();
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut writer = npyz::WriteOptions::<f64>::new()
        .default_dtype()
        .shape(&shape)
        .writer(file)
        .begin_nd()?;
    writer.extend(data.stored().iter().copied())?;
    writer.finish()
}

/// The dtypes [`read`] accepts, as NumPy spells them.
pub const ACCEPTED_DTYPES: &str = "float64 (`<f8`, `>f8`) or float32 (`<f4`, `>f4`)";

/// The longest header read: NumPy writes a few hundred bytes (format 1.0 caps it at 64 KiB).
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Why an `.npy` could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The file is not a readable `.npy` of floats; the message says why.
    Invalid(String),
    /// A valid `.npy` whose shape is not the one asked for.
    Shape(Vec<usize>),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Invalid(m) => f.write_str(m),
            ReadError::Shape(s) => write!(f, "it has shape {s:?}"),
        }
    }
}

fn invalid(message: impl Into<String>) -> ReadError {
    ReadError::Invalid(message.into())
}

/// Reads an `.npy` of float64 or float32 values of any shape, as [`read_as`] does.
pub fn read(path: &Path) -> std::io::Result<TensorData> {
    read_checked(path, None).map_err(|e| match e {
        ReadError::Io(e) => e,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    })
}

/// Reads an `.npy` of float64 or float32 values with shape `expected`, in C (row-major)
/// or Fortran (column-major) order; Fortran data is transposed into the row-major order
/// the interpreter uses. The header is checked (shape, dtype, that the data it declares
/// is all there) before any data is read, so a hostile header allocates nothing.
pub fn read_as(path: &Path, expected: &[usize]) -> Result<TensorData, ReadError> {
    read_checked(path, Some(expected))
}

fn read_checked(path: &Path, expected: Option<&[usize]>) -> Result<TensorData, ReadError> {
    let mut file = std::fs::File::open(path).map_err(ReadError::Io)?;
    let file_len = file.metadata().map_err(ReadError::Io)?.len();

    // Magic, version and header length: 10 bytes (format 1.0) or 12 (2.0 and 3.0).
    let mut prefix = [0u8; 12];
    let short = |what: &str| {
        invalid(format!(
            "not an .npy file: {file_len} bytes is too short for {what}"
        ))
    };
    file.read_exact(&mut prefix[..8])
        .map_err(|_| short("the magic string and version"))?;
    if &prefix[..6] != b"\x93NUMPY" {
        return Err(invalid(
            "not an .npy file: it does not start with the magic string `\\x93NUMPY`",
        ));
    }
    let (prefix_len, header_len) = match prefix[6] {
        1 => {
            file.read_exact(&mut prefix[8..10])
                .map_err(|_| short("the header length"))?;
            (10u64, u64::from(u16::from_le_bytes([prefix[8], prefix[9]])))
        }
        2 | 3 => {
            file.read_exact(&mut prefix[8..12])
                .map_err(|_| short("the header length"))?;
            let n = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
            (12u64, u64::from(n))
        }
        v => {
            return Err(invalid(format!(
                "unsupported .npy format version {v}.{} (1.0, 2.0 and 3.0 are read)",
                prefix[7]
            )))
        }
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "the .npy header claims {header_len} bytes (at most {MAX_HEADER_BYTES} are read)"
        )));
    }
    let data_start = prefix_len + header_len;
    if file_len < data_start {
        return Err(invalid(format!(
            "the file is truncated: its header ends at byte {data_start}, but the file has {file_len} bytes"
        )));
    }
    let mut head = prefix[..prefix_len as usize].to_vec();
    head.resize(data_start as usize, 0);
    file.read_exact(&mut head[prefix_len as usize..])
        .map_err(ReadError::Io)?;
    let header = npyz::NpyHeader::from_reader(&head[..])
        .map_err(|e| invalid(format!("the .npy header is not valid: {e}")))?;

    let dtype = header.dtype();
    // NumPy's spelling, e.g. `<i8`, without the Python quotes `descr()` keeps.
    let descr = dtype.descr().trim_matches('\'').to_string();
    let item_bytes: u64 = match &dtype {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float => match t.size_field() {
            8 | 4 => t.size_field(),
            _ => 0,
        },
        _ => 0,
    };
    if item_bytes == 0 {
        return Err(invalid(format!(
            "it holds `{descr}` values; einattn reads {ACCEPTED_DTYPES}"
        )));
    }

    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            invalid(format!(
                "its shape {:?} does not fit in memory",
                header.shape()
            ))
        })?;
    if expected.is_some_and(|e| shape != e) {
        return Err(ReadError::Shape(shape));
    }
    let elements = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| invalid(format!("its shape {shape:?} has too many elements")))?;
    let data_bytes = elements
        .checked_mul(item_bytes)
        .ok_or_else(|| invalid(format!("its shape {shape:?} has too many bytes")))?;
    let available = file_len - data_start;
    if available < data_bytes {
        return Err(invalid(format!(
            "the file is truncated: its header declares {elements} `{descr}` values ({data_bytes} bytes) but only {available} bytes follow it"
        )));
    }

    let mut data = vec![0u8; data_bytes as usize];
    file.seek(SeekFrom::Start(data_start))
        .and_then(|_| file.read_exact(&mut data))
        .map_err(ReadError::Io)?;
    let order = header.order();
    let reader = npyz::NpyFile::with_header(header, &data[..]);
    let stored: Vec<f64> = if item_bytes == 4 {
        reader
            .into_vec::<f32>()
            .map_err(ReadError::Io)?
            .into_iter()
            .map(f64::from)
            .collect()
    } else {
        reader.into_vec::<f64>().map_err(ReadError::Io)?
    };
    let values = match order {
        npyz::Order::C => stored,
        npyz::Order::Fortran => fortran_to_c(&stored, &shape),
    };
    Ok(TensorData::new(shape, values))
}

/// Reorders values stored column-major (the first index fastest) into row-major order.
fn fortran_to_c(stored: &[f64], shape: &[usize]) -> Vec<f64> {
    // Column-major strides: 1, d0, d0*d1, ...
    let mut strides = vec![1usize; shape.len()];
    for d in 1..shape.len() {
        strides[d] = strides[d - 1] * shape[d - 1];
    }
    let mut out = Vec::with_capacity(stored.len());
    let mut index = vec![0usize; shape.len()];
    for _ in 0..stored.len() {
        let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(stored[offset]);
        // Row-major odometer: the last index fastest.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortran_order_is_transposed_into_row_major() {
        // [[1, 2, 3], [4, 5, 6]] stored column-major is 1 4 2 5 3 6.
        let stored = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        assert_eq!(
            fortran_to_c(&stored, &[2, 3]),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        // Three dimensions: element (i, j, k) sits at i + 2 j + 4 k.
        let shape = [2, 2, 3];
        let stored: Vec<f64> = (0..12).map(f64::from).collect();
        let c = fortran_to_c(&stored, &shape);
        for i in 0..2 {
            for j in 0..2 {
                for k in 0..3 {
                    assert_eq!(c[i * 6 + j * 3 + k], (i + 2 * j + 4 * k) as f64);
                }
            }
        }
        assert_eq!(fortran_to_c(&[7.0], &[]), vec![7.0]);
    }
}
