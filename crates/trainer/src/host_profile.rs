//! Samples of the host's own time over a bench's timed steps (`bench --host-profile PATH`).
//!
//! When the host sets a step's pace (docs/ARCHITECTURE.md), the question is where its time
//! goes, and the lent GPU machine has no profiler for the host. With the `host-profile`
//! feature, the binary samples its own threads (pprof-rs: a `SIGPROF` timer and an unwind per
//! sample) and writes the stacks in the collapsed format of `flamegraph.pl` and `inferno`: one
//! line per distinct stack, `thread;outermost;...;innermost count`.
//! `xtask/peer/host_profile.py` sums them by function.

use std::path::Path;
#[cfg(feature = "host-profile")]
use std::path::PathBuf;

use crate::error::TrainError;

/// Samples per second of CPU time.
#[cfg(feature = "host-profile")]
const FREQUENCY: i32 = 997;

/// A running profile; [`HostProfile::finish`] writes it. Without the `host-profile` feature
/// there is none ([`HostProfile::start`] errs).
pub struct HostProfile {
    #[cfg(feature = "host-profile")]
    path: PathBuf,
    #[cfg(feature = "host-profile")]
    guard: pprof::ProfilerGuard<'static>,
    #[cfg(not(feature = "host-profile"))]
    never: std::convert::Infallible,
}

impl HostProfile {
    /// Whether this binary can profile into `path`: an error that says how to build one that
    /// can, when it was built without the `host-profile` feature. For a caller to refuse
    /// before any work, rather than when [`Self::start`] is reached.
    pub fn check_available(path: &Path) -> Result<(), TrainError> {
        if cfg!(feature = "host-profile") {
            Ok(())
        } else {
            Err(failed(
                path,
                "this binary has no host profiler; build it with `--features host-profile`".into(),
            ))
        }
    }

    /// Starts sampling every thread of the process.
    #[cfg(feature = "host-profile")]
    pub fn start(path: &Path) -> Result<Self, TrainError> {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            // Unwinding through these while they hold a lock can deadlock the sampled thread;
            // pprof drops the samples taken in them. Whole names: pprof matches substrings,
            // and a bare "libc" also dropped every sample in libcuda and libcublasLt.
            .blocklist(&[
                "/libc.so",
                "/libc-",
                "/libgcc_s",
                "/libpthread",
                "/ld-linux",
                "vdso",
            ])
            .build()
            .map_err(|err| failed(path, err.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            guard,
        })
    }

    /// Without the `host-profile` feature: [`Self::check_available`]'s error.
    #[cfg(not(feature = "host-profile"))]
    pub fn start(path: &Path) -> Result<Self, TrainError> {
        Self::check_available(path)?;
        unreachable!("check_available errs without the feature")
    }

    /// Stops sampling and writes the collapsed stacks, most frequent first.
    #[cfg(feature = "host-profile")]
    pub fn finish(self) -> Result<(), TrainError> {
        let report = self
            .guard
            .report()
            .build()
            .map_err(|err| failed(&self.path, err.to_string()))?;
        let mut lines: Vec<(isize, String)> = report
            .data
            .iter()
            .map(|(frames, &count)| {
                // pprof lists the innermost frame first; an address may stand for several
                // inlined functions, innermost first too.
                let mut stack = vec![frames.thread_name_or_id()];
                for address in frames.frames.iter().rev() {
                    stack.extend(address.iter().rev().map(|symbol| symbol.name()));
                }
                (count, stack.join(";"))
            })
            .collect();
        lines.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let text: String = lines
            .iter()
            .map(|(count, stack)| format!("{stack} {count}\n"))
            .collect();
        std::fs::write(&self.path, text).map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }

    #[cfg(not(feature = "host-profile"))]
    pub fn finish(self) -> Result<(), TrainError> {
        match self.never {}
    }
}

fn failed(path: &Path, reason: String) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("host profile: {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the feature, asking for a profile is an error that says how to get one.
    #[cfg(not(feature = "host-profile"))]
    #[test]
    fn without_the_feature_a_profile_is_an_error_naming_it() {
        let err = HostProfile::start(Path::new("profile.stacks"))
            .err()
            .expect("no profiler in this build");
        let text = err.to_string();
        assert!(text.contains("profile.stacks"), "{text}");
        assert!(text.contains("--features host-profile"), "{text}");
    }

    /// With it, a profile of some work is written as collapsed stacks: `frames count` lines,
    /// the thread first.
    #[cfg(feature = "host-profile")]
    #[test]
    fn a_profile_is_written_as_collapsed_stacks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.stacks");
        let profile = HostProfile::start(&path).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed().as_millis() < 300 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        profile.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let line = text.lines().next().expect("some samples in 300 ms of work");
        let (stack, count) = line.rsplit_once(' ').unwrap();
        assert!(count.parse::<u64>().unwrap() > 0);
        assert!(stack.contains(';'), "{line}");
    }
}
