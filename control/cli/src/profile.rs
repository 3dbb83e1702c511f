//! `--cpuprofile FILE`: samples the process's CPU use while a service runs and writes a
//! pprof profile when it stops, for `go tool pprof FILE` (or any pprof viewer).

use std::path::{Path, PathBuf};

use anyhow::Context;
use pprof::protos::Message;

/// Samples per second: pprof's usual rate, light enough for a service under load.
const FREQUENCY: i32 = 100;

/// A running CPU profile; [`CpuProfile::write`] stops it and writes the file.
pub struct CpuProfile {
    guard: pprof::ProfilerGuard<'static>,
    path: PathBuf,
}

impl CpuProfile {
    /// Starts sampling. The file is created now, so a path that cannot be written is an
    /// error at start rather than after hours of running.
    pub fn start(path: &Path) -> anyhow::Result<CpuProfile> {
        std::fs::File::create(path)
            .with_context(|| format!("cannot write the CPU profile to {}", path.display()))?;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            // Unwinding through these from a signal handler is not safe.
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .context("cannot start the CPU profiler")?;
        tracing::info!(file = %path.display(), "CPU profile started");
        Ok(CpuProfile {
            guard,
            path: path.to_path_buf(),
        })
    }

    /// Stops sampling and writes the profile (pprof's protobuf format).
    pub fn write(self) -> anyhow::Result<()> {
        let report = self
            .guard
            .report()
            .build()
            .context("cannot build the CPU profile")?;
        let profile = report.pprof().context("cannot encode the CPU profile")?;
        let mut body = Vec::new();
        profile
            .encode(&mut body)
            .context("cannot encode the CPU profile")?;
        std::fs::write(&self.path, body)
            .with_context(|| format!("cannot write the CPU profile to {}", self.path.display()))?;
        tracing::info!(file = %self.path.display(), "CPU profile written");
        Ok(())
    }
}
