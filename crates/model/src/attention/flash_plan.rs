//! What the fused attention (`flash/`) takes and how it is launched, outside the `flash`
//! feature: so that the backends decide on any build, the emulated kernels' test
//! (`tests/flash_emulated.rs`) launches them with the very shared-memory sizes the CUDA
//! launcher uses (the emulator checks that each kernel's layout fits), and both are tested
//! without CUDA.

use burn::tensor::{DType, Shape};

use super::AttentionParams;

/// Whether the fused kernels take a call of these sizes and settings: bf16, head size 64 or
/// 128, as many queries as keys, no query offset and no window (training). The CUDA launcher
/// still checks the layouts, and says why it falls back where they do not fit.
///
/// # Shapes
/// - q: `[batch, heads, q_len, head_dim]`, k: `[batch, kv_heads, k_len, head_dim]`
pub fn takes(q: &Shape, k: &Shape, dtype: DType, params: &AttentionParams) -> bool {
    let (q, k) = (q.as_slice(), k.as_slice());
    q.len() == 4
        && k.len() == 4
        && dtype == DType::BF16
        && matches!(q[3], 64 | 128)
        && q[2] == k[2]
        && q[2] > 0
        && params.query_offset == 0
        && params.window.is_none()
        && i32::try_from(q[0] * q[1] * q[2]).is_ok()
}

/// Warps per forward block, one per 16 queries (`QF_FORWARD_WARPS` in `flash.cu`).
pub const FORWARD_WARPS: usize = 4;

/// Warps per backward block, one per 16 keys (`QF_BACKWARD_WARPS` in `flash.cu`).
pub const BACKWARD_WARPS: usize = 4;

/// Keys per tile of the forward's walk (its `BC`).
pub const KEY_TILE: usize = 64;

/// Queries per forward block (the forward's `BR`).
pub const fn forward_rows() -> usize {
    16 * FORWARD_WARPS
}

/// Threads per forward block.
pub const fn forward_threads() -> usize {
    32 * FORWARD_WARPS
}

/// Keys per backward block (the backward's `BC`).
pub const fn backward_keys() -> usize {
    16 * BACKWARD_WARPS
}

/// Threads per backward block.
pub const fn backward_threads() -> usize {
    32 * BACKWARD_WARPS
}

/// Queries per backward iteration (`BR` of the backward, `QF_BACKWARD_ROWS` in `flash.cu`): 32
/// at either head size (at 128 the dK and dV accumulators take the registers of larger tiles;
/// at 64 the smaller tile's registers let three blocks share a multiprocessor).
pub fn backward_rows(_head_dim: usize) -> usize {
    32
}

/// Bytes of rows of `head_dim` bf16 at the kernels' pitch (`head_dim + 8`, which keeps the
/// fragment loads free of bank conflicts).
fn rows_bytes(rows: usize, head_dim: usize) -> usize {
    rows * (head_dim + 8) * 2
}

/// Shared memory of a forward block: the q tile, two k and two v tiles (the next one is copied
/// while this one is used) and two tiles' key segments.
pub fn forward_shared_bytes(head_dim: usize) -> usize {
    rows_bytes(forward_rows(), head_dim) + 4 * rows_bytes(KEY_TILE, head_dim) + 2 * KEY_TILE * 4
}

/// Shared memory of a backward block: the k and v tiles, the dS^T tile (`[keys][rows + 8]`),
/// two q and two dO tiles and two tiles' lse, D and query segments.
pub fn backward_shared_bytes(head_dim: usize) -> usize {
    let (rows, keys) = (backward_rows(head_dim), backward_keys());
    2 * rows_bytes(keys, head_dim)
        + keys * (rows + 8) * 2
        + 4 * rows_bytes(rows, head_dim)
        + 6 * rows * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query_offset: usize, window: Option<usize>) -> AttentionParams {
        AttentionParams {
            query_offset,
            window,
            chunk_memory_bytes: 1 << 30,
        }
    }

    #[test]
    fn the_fused_kernels_take_training_calls_in_bf16_with_head_size_64_or_128() {
        let shape = |dims: [usize; 4]| Shape::from(dims.to_vec());
        let training = params(0, None);
        for d in [64, 128] {
            let (q, k) = (shape([8, 14, 2048, d]), shape([8, 2, 2048, d]));
            assert!(takes(&q, &k, DType::BF16, &training), "head size {d}");
            assert!(!takes(&q, &k, DType::F32, &training), "f32");
            assert!(
                !takes(&q, &k, DType::BF16, &params(5, None)),
                "a query offset"
            );
            assert!(
                !takes(&q, &k, DType::BF16, &params(0, Some(64))),
                "a window"
            );
        }
        let (q, k) = (shape([1, 2, 16, 80]), shape([1, 2, 16, 80]));
        assert!(!takes(&q, &k, DType::BF16, &training), "head size 80");
        let (q, k) = (shape([1, 2, 1, 64]), shape([1, 2, 17, 64]));
        assert!(
            !takes(&q, &k, DType::BF16, &training),
            "decoding against a cache"
        );
    }

    #[test]
    fn shared_memory_fits_an_h100_block_and_grows_with_the_head_size() {
        // 227 KiB is the most one block may ask for on compute capability 9.0.
        for d in [64, 128] {
            assert!(forward_shared_bytes(d) <= 227 << 10 && backward_shared_bytes(d) <= 227 << 10);
        }
        assert!(forward_shared_bytes(128) > forward_shared_bytes(64));
        assert_eq!(backward_rows(64), 32);
        assert_eq!(backward_rows(128), 32);
    }

    #[test]
    fn the_kernels_are_built_with_these_warps_per_block() {
        let source = include_str!("flash/flash.cu");
        for (name, warps) in [
            ("QF_FORWARD_WARPS", FORWARD_WARPS),
            ("QF_BACKWARD_WARPS", BACKWARD_WARPS),
            ("QF_BACKWARD_ROWS", backward_rows(64)),
            ("QF_BACKWARD_ROWS", backward_rows(128)),
        ] {
            assert!(
                source.contains(&format!("#define {name} {warps}\n")),
                "flash.cu defines {name} as {warps}"
            );
        }
        assert!(forward_threads() <= 256 && backward_threads() <= 256);
    }
}
