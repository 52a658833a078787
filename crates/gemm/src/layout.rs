//! How a strided tensor maps onto a strided-batched matrix product (cuBLASLt's layout), kept
//! free of any GPU type so that CI tests it.

/// A `[..batch, rows, cols]` tensor as one strided batch of row-major matrices: unit-stride
/// rows `ld` elements apart, every batch dimension collapsed into one of stride `batch_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchedLayout {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub batch_stride: usize,
}

impl BatchedLayout {
    /// The layout of a tensor of `shape` and `strides` (in elements), or `None` where it does
    /// not fit: columns not unit-stride, rows overlapping, or batch dimensions that do not step
    /// over whole inner ones (`stride[i] = stride[i + 1] * size[i + 1]`, size-1 dimensions
    /// aside). Pitched rows (`ld > cols`) and a narrowed middle dimension fit.
    ///
    /// # Panics
    /// If `shape` has fewer than two dimensions or `strides` another length.
    pub fn of(shape: &[usize], strides: &[usize]) -> Option<Self> {
        let rank = shape.len();
        assert!(
            rank >= 2 && strides.len() == rank,
            "layout: shape {shape:?} and strides {strides:?}"
        );
        let (rows, cols, ld) = (shape[rank - 2], shape[rank - 1], strides[rank - 2]);
        if strides[rank - 1] != 1 || ld < cols {
            return None;
        }
        let (mut batch, mut batch_stride) = (1, None);
        for dim in (0..rank - 2).rev().filter(|&dim| shape[dim] != 1) {
            match batch_stride {
                None => batch_stride = Some(strides[dim]),
                Some(inner) if strides[dim] == inner * batch => {}
                Some(_) => return None,
            }
            batch *= shape[dim];
        }
        Some(Self {
            batch,
            rows,
            cols,
            ld,
            batch_stride: batch_stride.unwrap_or(rows * ld),
        })
    }

    /// The elements from the first to one past the last.
    pub fn span(&self) -> usize {
        (self.batch - 1) * self.batch_stride + (self.rows - 1) * self.ld + self.cols
    }
}

#[cfg(test)]
mod tests {
    use super::BatchedLayout;

    fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![1; shape.len()];
        for dim in (0..shape.len() - 1).rev() {
            strides[dim] = strides[dim + 1] * shape[dim + 1];
        }
        strides
    }

    #[test]
    fn a_contiguous_tensor_is_one_batch_of_its_leading_dimensions() {
        let shape = [2, 3, 4, 5];
        let layout = BatchedLayout::of(&shape, &contiguous_strides(&shape)).unwrap();
        let expected = BatchedLayout {
            batch: 6,
            rows: 4,
            cols: 5,
            ld: 5,
            batch_stride: 20,
        };
        assert_eq!(layout, expected);
        assert_eq!(layout.span(), 2 * 3 * 4 * 5);
    }

    /// The attention's key rows: `[batch, kv_heads, len, d]` narrowed along `len`.
    #[test]
    fn a_narrowed_key_range_keeps_its_parents_strides() {
        let parent = contiguous_strides(&[8, 2, 2048, 64]);
        let layout = BatchedLayout::of(&[8, 2, 500, 64], &parent).unwrap();
        assert_eq!(
            (layout.batch, layout.ld, layout.batch_stride),
            (16, 64, 2048 * 64)
        );
        assert_eq!(layout.span(), 15 * 2048 * 64 + 499 * 64 + 64);
    }

    #[test]
    fn pitched_rows_and_unit_dimensions_fit() {
        let layout = BatchedLayout::of(&[1, 3, 5], &[99, 8, 1]).unwrap();
        assert_eq!((layout.batch, layout.ld, layout.batch_stride), (1, 8, 24));
        let layout = BatchedLayout::of(&[4, 1, 3, 5], &[24, 24, 8, 1]).unwrap();
        assert_eq!((layout.batch, layout.batch_stride), (4, 24));
    }

    #[test]
    fn transposed_overlapping_or_permuted_tensors_do_not_fit() {
        // A transposed [5, 4] view: its columns are 4 apart.
        assert_eq!(BatchedLayout::of(&[4, 5], &[1, 4]), None);
        // Rows closer than their length.
        assert_eq!(BatchedLayout::of(&[4, 5], &[3, 1]), None);
        // Batch dimensions swapped: the outer one steps less than the inner block.
        assert_eq!(BatchedLayout::of(&[3, 2, 4, 5], &[20, 60, 5, 1]), None);
    }
}
