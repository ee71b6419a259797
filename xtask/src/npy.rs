//! Minimal `.npy` (format 1.0) writer, to hand matrices to the numpy reference.

use std::io::Write;
use std::path::Path;

/// Writes a row-major `rows × cols` matrix of `f64` (`'<f8'`) or `f32` (`'<f4'`).
pub fn write<T: Copy + ToLe>(
    path: &Path,
    data: &[T],
    rows: usize,
    cols: usize,
) -> std::io::Result<()> {
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}",
        T::DESCR
    );
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for x in data {
        x.write_le(&mut f)?;
    }
    f.flush()
}

/// Little-endian element encoding.
pub trait ToLe {
    /// numpy dtype descriptor.
    const DESCR: &'static str;
    /// Writes the value.
    fn write_le(&self, w: &mut impl Write) -> std::io::Result<()>;
}

impl ToLe for f64 {
    const DESCR: &'static str = "<f8";
    fn write_le(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.to_le_bytes())
    }
}

impl ToLe for f32 {
    const DESCR: &'static str = "<f4";
    fn write_le(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.to_le_bytes())
    }
}
