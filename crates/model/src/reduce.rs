//! Sums over many rows in two stages, for the gradients that sum over every token (the biases',
//! RMSNorm's weight) and for a sum over every parameter (the optimizer's global norm).
//!
//! Without autotuning, CubeCL's reduction gives each output one thread that walks the whole
//! reduced axis. Summing the `[16384, 896]` gradient of a batch-8 step over its rows is then
//! 112 threads (896 outputs, 8 to a vector) each taking 16,384 steps: about 1.3 ms on the H200
//! for 30 MB, and such column sums were half the GPU time of a step (docs/BENCHMARKS.md). Viewed
//! as `[parts, rows / parts, n]`, the first stage has `parts * n` outputs each taking
//! `rows / parts` steps, with neighbouring threads reading neighbouring addresses, and the
//! second sums `parts` values per column:
//!
//! ```text
//! [rows, n] -> [parts, rows / parts, n] -sum axis 1-> [parts, 1, n] -sum axis 0-> [1, n]
//! ```
//!
//! A sum differs from the one-stage sum only in the order of its additions. Both functions sum
//! in the input's dtype: callers cast to f32 first where the terms are in bf16.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// Below this many rows a one-stage sum has enough threads per step to keep up.
const MIN_ROWS: usize = 256;

/// How many parts to split `rows` into: the divisor of `rows` closest to its square root from
/// below, so that the two stages take about as many steps each; `None` when `rows` is small or
/// has no divisor of at least 16 there (a prime row count, say).
fn row_parts(rows: usize) -> Option<usize> {
    if rows < MIN_ROWS {
        return None;
    }
    let root = rows.isqrt();
    let parts = (1..=root).rev().find(|&d| rows.is_multiple_of(d))?;
    (parts >= 16).then_some(parts)
}

/// The sum over rows of `[rows, n]`, as `[1, n]`: `x.sum_dim(0)`, in two stages when there are
/// many rows.
pub fn sum_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, n] = x.dims();
    match row_parts(rows) {
        Some(parts) => x
            .reshape([parts, rows / parts, n])
            .sum_dim(1) // [parts, 1, n]
            .reshape([parts, n])
            .sum_dim(0),
        None => x.sum_dim(0),
    }
}

/// How many values a row of [`sum_all`]'s view holds, and how many rows its bulk is a multiple
/// of (so that [`sum_rows`] splits it evenly).
const ROW: usize = 4096;
const ROW_MULTIPLE: usize = 256;

/// The sum of every value of `x`, as `[1]`: `x.sum()`, with the bulk summed as rows of a
/// `[len / 4096, 4096]` view by [`sum_rows`] and the tail (fewer than 2^20 values) on its own.
pub fn sum_all<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let [len] = x.dims();
    let bulk = len - len % (ROW * ROW_MULTIPLE);
    if bulk == 0 {
        return x.sum();
    }
    // [bulk] -> [bulk / ROW, ROW] -> [1, ROW] -> [1]
    let head = sum_rows(x.clone().slice(0..bulk).reshape([bulk / ROW, ROW])).sum();
    if bulk == len {
        head
    } else {
        head + x.slice(bulk..len).sum()
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    use super::*;

    type B = Flex;

    #[test]
    fn row_parts_near_the_square_root() {
        assert_eq!(row_parts(16_384), Some(128)); // batch 8 x seq 2048
        assert_eq!(row_parts(8 * 2047), Some(92)); // 2^3 * 23 * 89: 4 * 23 below 127.97
        assert_eq!(row_parts(4099), None); // prime
        assert_eq!(row_parts(255), None);
        assert_eq!(row_parts(256), Some(16));
    }

    /// The sums in f64 of `values` viewed as `[rows, n]`, over rows.
    fn column_sums(values: &[f32], n: usize) -> Vec<f32> {
        (0..n)
            .map(|j| {
                values
                    .iter()
                    .skip(j)
                    .step_by(n)
                    .map(|&v| f64::from(v))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// Against the exact sum in f64, on positive terms (so that a relative tolerance means
    /// something): a lost or doubled part (at least 1/16 of a column) is far outside 1e-4.
    #[test]
    fn sum_rows_equals_the_exact_sum() {
        let device = Default::default();
        B::seed(&device, 1);
        for [rows, n] in [[16_384, 7], [8 * 2047, 3], [4099, 5], [300, 2], [1, 4]] {
            let x = Tensor::<B, 2>::random([rows, n], Distribution::Uniform(0.0, 1.0), &device);
            let exact = column_sums(&x.to_data().to_vec::<f32>().unwrap(), n);
            sum_rows(x).into_data().assert_approx_eq::<f32>(
                &TensorData::new(exact, [1, n]),
                Tolerance::relative(1e-4),
            );
        }
    }

    #[test]
    fn sum_all_equals_the_exact_sum() {
        let device = Default::default();
        B::seed(&device, 2);
        let whole = ROW * ROW_MULTIPLE;
        for len in [2 * whole, 2 * whole + 12_345, whole - 1, 3] {
            let x = Tensor::<B, 1>::random([len], Distribution::Uniform(0.0, 1.0), &device);
            let exact = column_sums(&x.to_data().to_vec::<f32>().unwrap(), 1);
            sum_all(x)
                .into_data()
                .assert_approx_eq::<f32>(&TensorData::new(exact, [1]), Tolerance::relative(1e-4));
        }
    }
}
