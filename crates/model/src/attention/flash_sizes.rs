//! The fused attention's launch sizes (`flash/flash.cu`), outside the `flash` feature so that
//! the emulated kernels' test (`tests/flash_emulated.rs`) launches them with the very sizes the
//! CUDA launcher uses; the emulator checks that each kernel's shared-memory layout fits.

/// Queries per forward block and keys per backward block (`BR`/`BC` of the forward, `BC` of
/// the backward).
pub const TILE: usize = 64;

/// Queries per backward iteration (`BR` of the backward): 32 for head size 128, whose dK and
/// dV accumulators take twice the registers.
pub fn backward_rows(head_dim: usize) -> usize {
    if head_dim > 64 { 32 } else { 64 }
}

/// Bytes of rows of `head_dim` bf16 at the kernels' pitch (`head_dim + 8`, which keeps the
/// fragment loads free of bank conflicts).
fn rows_bytes(rows: usize, head_dim: usize) -> usize {
    rows * (head_dim + 8) * 2
}

/// Shared memory of a forward block: the q tile, two k and two v tiles (the next one is copied
/// while this one is used) and two tiles' key segments.
pub fn forward_shared_bytes(head_dim: usize) -> usize {
    5 * rows_bytes(TILE, head_dim) + 2 * TILE * 4
}

/// Shared memory of a backward block: the k and v tiles, the dS^T tile (`[TILE][rows + 8]`),
/// two q and two dO tiles, and two tiles' lse, D and query segments.
pub fn backward_shared_bytes(head_dim: usize) -> usize {
    let rows = backward_rows(head_dim);
    2 * rows_bytes(TILE, head_dim)
        + TILE * (rows + 8) * 2
        + 4 * rows_bytes(rows, head_dim)
        + 6 * rows * 4
}
