//! Running uv: finding the binary, the flags every call shares, and turning its stderr into
//! an error a user can act on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::StoreError;

/// Where `scripts/setup` leaves uv when it cannot put it on PATH.
const FALLBACKS: [&str; 1] = ["/usr/local/bin/uv"];

/// The uv binary: `$QUIVER_UV`, else `uv` on PATH, else where `scripts/setup` installs it.
pub fn find_uv() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QUIVER_UV").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    // pyenv's shims re-enter a shell script on every call; the real binary is elsewhere.
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .filter(|dir| !dir.ends_with("shims"))
        .map(|dir| dir.join("uv"));
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/bin/uv"));
    on_path
        .chain(home)
        .chain(FALLBACKS.iter().map(PathBuf::from))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A uv invocation with the flags every call shares: the store's cache, hard links out of it,
/// no user configuration, local interpreters only, no colours in messages.
pub fn command(uv: &Path, cache: &Path, sub: &[&str]) -> Command {
    let mut cmd = Command::new(uv);
    cmd.args(sub)
        .arg("--cache-dir")
        .arg(cache)
        .args([
            "--no-config",
            "--color",
            "never",
            "--python-preference",
            "only-system",
            "--no-python-downloads",
        ])
        .env("UV_LINK_MODE", "hardlink")
        .env("NO_COLOR", "1")
        .env_remove("VIRTUAL_ENV")
        .env_remove("CONDA_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs a uv command, feeding `input` on stdin; returns its stdout, or its trimmed stderr as
/// the error built by `fail`.
pub fn run(
    mut cmd: Command,
    input: Option<&str>,
    fail: impl FnOnce(String) -> StoreError,
) -> Result<String, StoreError> {
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|e| StoreError::Io {
        context: format!("running {program}"),
        source: e,
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A uv that exits early closes its stdin; its exit status says why.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| StoreError::Io {
        context: format!("waiting for {program}"),
        source: e,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let mut msg = trim_stderr(&String::from_utf8_lossy(&out.stderr));
        if msg.is_empty() {
            msg = format!("uv exited with {}", out.status);
        }
        Err(fail(msg))
    }
}

/// The lines of uv's stderr that explain a failure: its progress chatter goes, and so does
/// anything past a screenful.
pub fn trim_stderr(stderr: &str) -> String {
    const CHATTER: [&str; 11] = [
        "Using ",
        "Resolved ",
        "Prepared ",
        "Installed ",
        "Uninstalled ",
        "Audited ",
        "Creating virtual environment",
        "Activate with",
        " + ",
        " - ",
        "Downloading ",
    ];
    const MAX_LINES: usize = 30;
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !CHATTER.iter().any(|c| l.starts_with(c)))
        .collect();
    let mut out = lines[..lines.len().min(MAX_LINES)].join("\n");
    if lines.len() > MAX_LINES {
        out.push_str(&format!("\n... ({} more lines)", lines.len() - MAX_LINES));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::trim_stderr;

    #[test]
    fn chatter_is_dropped() {
        let err = "Using CPython 3.11.7 interpreter at: /x\nResolved 2 packages in 1ms\n\n\
                   error: No solution found when resolving dependencies\n  cause: Because gamma was not found\n";
        assert_eq!(
            trim_stderr(err),
            "error: No solution found when resolving dependencies\n  cause: Because gamma was not found"
        );
    }
}
