//! Says whether telemetry can run here and, if so, what it probes:
//! `cargo run -p quiver-ebpf --example status`.

fn main() {
    match quiver_ebpf::Telemetry::start() {
        Ok(t) => {
            let p = t.copy_probes();
            println!(
                "telemetry available; copy meter on {}:",
                p.library.display()
            );
            for probe in &p.probes {
                println!("  {:#x} ({})", probe.file_offset, probe.symbols.join(", "));
            }
            println!("kernel ids: {:?}", t.kernel_ids());
        }
        Err(e) => {
            println!("{e}");
            std::process::exit(1);
        }
    }
}
