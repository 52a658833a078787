//! The fused attention's CUDA kernels (`src/attention/flash/flash.cu`) without a GPU: the same
//! source compiled on the host against `emulate.hpp`, where each thread of a block is an OS
//! thread and `mma.sync`, `ldmatrix` and the warp shuffles are emulated from their PTX
//! definitions. `emulate_test.cpp` runs the forward, the row sums and the backward on random
//! bf16 inputs and compares them with a plain attention in f64: outputs, log-sum-exp and the
//! three gradients, and rows that see no key (zero output and gradient, lse +inf). Each block
//! gets the shared memory the CUDA launcher gives it (`attention::flash_plan`), and the
//! emulator checks that the kernels' layouts fit in it.
//!
//! Needs a C++20 compiler: `$CXX`, else `c++` (`.ci/run` installs g++).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use qwen_model::attention::flash_plan;

/// The harness, built once per test process.
fn harness() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/attention/flash");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flash_emulate_test");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-o"])
            .arg(&out)
            .arg(dir.join("emulate_test.cpp"))
            .status()
            .unwrap_or_else(|err| {
                panic!("`{cxx}` does not run ({err}): this test needs a C++20 compiler (install g++, or set CXX)")
            });
        assert!(status.success(), "`{cxx}` could not build emulate_test.cpp");
        out
    })
}

/// Runs one configuration; fails with the harness's report line if it does.
fn run(head_dim: usize, batch: usize, heads: usize, kv_heads: usize, seq: usize, seed: u64) {
    let shared = [
        flash_plan::forward_shared_bytes(head_dim),
        flash_plan::backward_shared_bytes(head_dim),
    ];
    let args = [
        head_dim,
        batch,
        heads,
        kv_heads,
        seq,
        seed as usize,
        shared[0],
        shared[1],
        flash_plan::forward_rows(),
        flash_plan::forward_threads(),
        flash_plan::backward_keys(),
        flash_plan::backward_threads(),
    ]
    .map(|x| x.to_string());
    let output = Command::new(harness())
        .args(&args)
        .output()
        .expect("the harness runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "flash kernels (emulated), d {head_dim}, batch {batch}, heads {heads}/{kv_heads}, seq {seq}: {report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("empty_rows ok"), "{report}");
}

/// Head size 64 (Qwen2.5-0.5B), query heads grouped 2 per kv head, a length that is not a
/// multiple of the 64-row tiles.
#[test]
fn head_dim_64_grouped_heads() {
    run(64, 2, 4, 2, 130, 1);
}

/// The 0.5b grouping (7 query heads per kv head), one batch row of two packed segments.
#[test]
fn head_dim_64_seven_heads_per_kv_head() {
    run(64, 1, 7, 1, 200, 3);
}

/// Head size 128 (Qwen2.5-1.5B and up): the backward's 32-row query tiles and split dQ.
#[test]
fn head_dim_128_grouped_heads() {
    run(128, 2, 4, 2, 130, 2);
}

/// Head size 128 with one head per kv head and fewer keys than a tile.
#[test]
fn head_dim_128_shorter_than_a_tile() {
    run(128, 1, 2, 2, 40, 4);
}
