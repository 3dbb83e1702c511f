//! Writing a command's output to stdout. `print!` panics when the reader has gone
//! (`esperctl decisions list | head -1`: Rust ignores SIGPIPE, so the write fails with
//! EPIPE); a reader that stopped reading wants nothing more, so that ends the output
//! quietly, as it does for other command-line tools.

use std::io::{self, Write};

/// Writes `text` to stdout and flushes it. A closed pipe is not an error.
pub fn write(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// [`write`] with a newline after `line`.
pub fn line(line: &str) -> io::Result<()> {
    write(&format!("{line}\n"))
}
