//! `envs`: how long the environment store takes to give a function its environment: a new spec
//! with pyarrow and pandas on an empty uv cache (from the index) and on a warm one, the same
//! spec plus one package already in the cache (`add-package-warm`) and plus one the cache has
//! never seen (`add-package-uncached`, online only), and a lookup of a known spec.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quiver_envs::{EnvSpec, Store, StoreOptions};
use serde::Serialize;

/// Arguments of `quiver-bench envs`.
#[derive(clap::Args)]
pub struct Args {
    /// The Python version.
    #[arg(long, default_value = "3.11")]
    python: String,
    /// The package `add-package-warm` adds to the pyarrow + pandas spec (put in the cache by an
    /// unmeasured build of its own first).
    #[arg(long, default_value = "polars")]
    add: String,
    /// The package `add-package-uncached` adds (fetched from the index; skipped offline).
    #[arg(long, default_value = "six")]
    add_uncached: String,
    /// Install from this wheel folder instead of the index (no network; `new-cold` then
    /// measures an empty cache filled from local wheels).
    #[arg(long)]
    wheels: Option<PathBuf>,
    /// The package index (default: uv's, PyPI).
    #[arg(long)]
    index_url: Option<String>,
    /// Where the scratch stores and cache go (one file system, so installs are hard links).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// One JSON object per variant instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    variant: &'static str,
    seconds: f64,
}

/// Runs the variants in order; each later one relies on the cache the earlier ones filled.
pub fn run(args: Args) -> Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("quiver-bench-envs-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a scratch folder in {}", args.dir.display()))?;
    let cache = scratch.path().join("uv-cache");
    let open = |name: &str| -> Result<Store> {
        let opts = StoreOptions {
            root: scratch.path().join(name),
            cache: cache.clone(),
            wheels: args.wheels.clone(),
            index_url: args.index_url.clone(),
            ..StoreOptions::default()
        };
        Ok(Store::open(opts)?)
    };
    let base = EnvSpec::new(&args.python, [("pyarrow", ""), ("pandas", "")]);
    let mut added = base.clone();
    added.pip.insert(args.add.clone(), String::new());
    let mut uncached = base.clone();
    uncached.pip.insert(args.add_uncached.clone(), String::new());

    let mut rows = Vec::new();
    let mut measure = |variant: &'static str, store: &Store, spec: &EnvSpec| -> Result<()> {
        let start = Instant::now();
        let env = store.ensure(spec, &|_| {}).with_context(|| format!("{variant}: building the environment"))?;
        let seconds = start.elapsed().as_secs_f64();
        if !args.json {
            eprintln!("{variant}: {seconds:.3} s, {} packages, {}", env.lock.lines().count(), env.path.display());
        }
        rows.push(Row { variant, seconds });
        Ok(())
    };
    measure("new-cold", &open("cold")?, &base)?;
    let warm = open("warm")?;
    measure("new-warm", &warm, &base)?;
    // The added package alone, in a store of its own: afterwards the cache holds its wheel.
    open("prime")?
        .ensure(&EnvSpec::new(&args.python, [(args.add.as_str(), "")]), &|_| {})
        .with_context(|| format!("putting {} in the cache", args.add))?;
    measure("add-package-warm", &warm, &added)?;
    if args.wheels.is_none() {
        measure("add-package-uncached", &warm, &uncached)?;
    }

    // A known spec is a lookup; the median of many says what a function start pays for it.
    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let start = Instant::now();
            warm.ensure(&added, &|_| {}).map(|_| start.elapsed())
        })
        .collect::<Result<_, _>>()?;
    times.sort();
    rows.push(Row { variant: "lookup", seconds: times[times.len() / 2].as_secs_f64() });

    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!("{:<22} {:>10}", "variant", "seconds");
        for r in &rows {
            println!("{:<22} {:>10.4}", r.variant, r.seconds);
        }
    }
    Ok(())
}
