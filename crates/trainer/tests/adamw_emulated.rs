//! The AdamW kernels (`src/fused_adamw/adamw.cu`) without a GPU: the same source compiled on the
//! host, one thread per block, by `adamw_host_test.cpp`, which runs the global norm and two
//! clipped, decayed steps over 70 tensors of awkward sizes and alignments (two launches each)
//! against the same step in f64. The block reductions are the GPU's alone; the device's
//! `check-fast-path` compares the kernels' step with the tensor ops there.
//!
//! Needs a C++20 compiler: `$CXX`, else `c++` (`.ci/run` installs g++).

use std::path::Path;
use std::process::Command;

#[test]
fn adamw_kernels_match_the_f64_step() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fused_adamw");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("adamw_host_test");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas", "-o"])
        .arg(&out)
        .arg(dir.join("adamw_host_test.cpp"))
        .status()
        .unwrap_or_else(|err| {
            panic!("`{cxx}` does not run ({err}): this test needs a C++20 compiler (install g++, or set CXX)")
        });
    assert!(
        status.success(),
        "`{cxx}` could not build adamw_host_test.cpp"
    );
    for seed in ["1", "2", "3"] {
        let output = Command::new(&out)
            .arg(seed)
            .output()
            .expect("the harness runs");
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && report.starts_with("ok"),
            "seed {seed}: {report}"
        );
    }
}
