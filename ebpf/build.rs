//! Compiles the BPF programs in `bpf/` with clang into OUT_DIR and writes `object.rs`, which
//! embeds the object or, when it cannot be built here, the reason, so the crate still builds and
//! reports "telemetry unavailable" at run time.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 2] = ["bpf/quiver.bpf.c", "bpf/quiver.h"];

fn main() {
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("quiver.bpf.o");
    let body = match compile(&object) {
        Ok(()) => format!(
            "Ok(aya::include_bytes_aligned!({:?}))",
            object.to_str().expect("OUT_DIR is UTF-8")
        ),
        Err(reason) => {
            println!("cargo:warning=quiver-ebpf: telemetry unavailable in this build: {reason}");
            format!("Err({reason:?})")
        }
    };
    let code = format!(
        "/// The compiled BPF object, or why this build has none.\n\
         pub(crate) static OBJECT: Result<&[u8], &str> = {body};\n"
    );
    std::fs::write(out.join("object.rs"), code).expect("write object.rs");
}

/// Runs clang on the programs; the error is one line for the warning and the run-time message.
fn compile(object: &Path) -> Result<(), String> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" {
        // The copy meter reads the x86-64 argument registers.
        return Err(format!("the BPF programs support x86_64 only, not {arch}"));
    }
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let mut cmd = Command::new(&clang);
    cmd.args([
        "-O2",
        "-g",
        "-target",
        "bpf",
        "-Wall",
        "-Werror",
        "-D__TARGET_ARCH_x86",
    ]);
    // With -target bpf clang does not search the multiarch directory that holds <asm/types.h>.
    cmd.arg("-I/usr/include/x86_64-linux-gnu");
    cmd.arg("-c").arg(SOURCES[0]).arg("-o").arg(object);
    match cmd.output() {
        Err(e) => Err(format!(
            "cannot run {clang} ({e}); scripts/setup installs clang"
        )),
        Ok(o) if !o.status.success() => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let first = stderr
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("no output");
            let hint = if stderr.contains("bpf_helpers.h") {
                " (libbpf-dev is missing; scripts/setup installs it)"
            } else {
                ""
            };
            Err(format!("{clang} failed on {}: {first}{hint}", SOURCES[0]))
        }
        Ok(_) => Ok(()),
    }
}
