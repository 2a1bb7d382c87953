//! `.npy` input and output for `einattn run`, so results compare directly with NumPy/PyTorch.

use einattn_ir::interp::TensorData;
use npyz::WriterBuilder;
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

/// Reads an `.npy` of float64 or float32 values (any shape; the caller checks it).
pub fn read(path: &Path) -> std::io::Result<TensorData> {
    let bytes = std::fs::read(path)?;
    let file = npyz::NpyFile::new(&bytes[..])?;
    let shape: Vec<usize> = file.shape().iter().map(|&d| d as usize).collect();
    let values: Vec<f64> = match file.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 => {
            file.into_vec::<f32>()?.into_iter().map(f64::from).collect()
        }
        _ => file.into_vec::<f64>()?,
    };
    Ok(TensorData::new(shape, values))
}
