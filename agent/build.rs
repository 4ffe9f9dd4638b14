//! Compiles the DuckDB shims (shim/arrow_scan.cpp, shim/arrow_export.cpp) against the bundled DuckDB's
//! headers, which libduckdb-sys publishes (`links = "duckdb"` → `DEP_DUCKDB_INCLUDE`).

fn main() {
    let include = std::env::var("DEP_DUCKDB_INCLUDE")
        .expect("libduckdb-sys (bundled) publishes its include folder as DEP_DUCKDB_INCLUDE");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include(&include)
        // libduckdb-sys is built with debug = false in every profile (root Cargo.toml), which
        // makes it define NDEBUG; DuckDB's headers change layout with it, so match.
        .define("NDEBUG", None)
        .warnings(false)
        .file("shim/arrow_scan.cpp")
        .file("shim/arrow_export.cpp")
        .compile("quiver_duckdb_shim");
    println!("cargo:rerun-if-changed=shim/arrow_scan.cpp");
    println!("cargo:rerun-if-changed=shim/arrow_export.cpp");
}
