//! `quiver env`: build, list and remove the Python environments functions run in.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_envs::{Env, EnvSpec, GcPolicy, Progress, Store, StoreOptions};

/// The `quiver env` subcommands.
#[derive(Subcommand)]
pub enum EnvCmd {
    /// Resolve and build an environment; one that exists already is a lookup.
    Build {
        /// The Python version.
        #[arg(long, default_value = "3.11")]
        python: String,
        /// A JSON spec, `{"python": "3.11", "pip": {"pandas": "2.2"}}`, instead of arguments.
        #[arg(long, conflicts_with = "packages")]
        spec: Option<PathBuf>,
        /// Requirements: NAME, NAME==VERSION, or NAME with a specifier (`NAME>=2,<3`).
        packages: Vec<String>,
        /// Print the environment as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the environments, most recently used first.
    Ls {
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove environments by key.
    Rm {
        /// Keys as `quiver env ls` shows them.
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove environments not among the most recently used or unused for a while.
    Gc {
        /// Keep this many of the most recently used.
        #[arg(long)]
        keep: Option<usize>,
        /// Remove only those unused for this many days.
        #[arg(long)]
        older_than_days: Option<f64>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the store is and how it builds.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// The environments' folder.
    #[arg(long, env = "QUIVER_ENVS", default_value = "/var/lib/quiver/envs")]
    root: PathBuf,
    /// uv's shared cache (keep it on the file system of --root so installs are hard links).
    #[arg(long, env = "QUIVER_UV_CACHE", default_value = "/var/cache/quiver/uv")]
    cache: PathBuf,
    /// The uv binary (default: $QUIVER_UV, uv on PATH, /usr/local/bin/uv).
    #[arg(long)]
    uv: Option<PathBuf>,
    /// Offline: install only from the wheels in this folder.
    #[arg(long, env = "QUIVER_WHEELS")]
    wheels: Option<PathBuf>,
    /// The package index (default: uv's, PyPI).
    #[arg(long)]
    index_url: Option<String>,
    /// Leave out the base packages (pyarrow) every function environment gets.
    #[arg(long)]
    no_base: bool,
}

impl StoreArgs {
    fn open(self) -> Result<Store> {
        let mut opts = StoreOptions {
            root: self.root,
            cache: self.cache,
            uv: self.uv,
            wheels: self.wheels,
            index_url: self.index_url,
            ..StoreOptions::default()
        };
        if self.no_base {
            opts.base.clear();
        }
        let root = opts.root.clone();
        Store::open(opts).with_context(|| format!("opening the environment store at {}", root.display()))
    }
}

/// Runs a `quiver env` subcommand.
pub fn run(cmd: EnvCmd) -> Result<()> {
    match cmd {
        EnvCmd::Build { python, spec, packages, json, store } => {
            let spec = match spec {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    serde_json::from_str(&text).with_context(|| format!("{} is not an environment spec", path.display()))?
                }
                None => EnvSpec { python, pip: packages.iter().map(|p| split_requirement(p)).collect() },
            };
            let store = store.open()?;
            let env = build(&store, &spec)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&env_json(&env, store.last_used(&env.key)))?);
            } else {
                println!("{}", env.path.display());
            }
            Ok(())
        }
        EnvCmd::Ls { json, store } => {
            let store = store.open()?;
            let envs = store.list()?;
            if json {
                let all: Vec<_> = envs.iter().map(|e| env_json(e, store.last_used(&e.key))).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            println!("{:<24}  {:<8}  {:>9}  {:>8}  REQUIREMENTS", "KEY", "PYTHON", "LAST USED", "PACKAGES");
            for e in &envs {
                let reqs: Vec<String> = e
                    .spec
                    .pip
                    .iter()
                    .map(|(k, v)| if v.is_empty() { k.clone() } else { format!("{k} {v}") })
                    .collect();
                println!(
                    "{:<24}  {:<8}  {:>9}  {:>8}  {}",
                    e.key,
                    e.python_version,
                    ago(store.last_used(&e.key)),
                    e.lock.lines().count(),
                    reqs.join(", ")
                );
            }
            Ok(())
        }
        EnvCmd::Rm { keys, store } => {
            let store = store.open()?;
            for key in keys {
                store.remove(&key)?;
                println!("removed {key}");
            }
            Ok(())
        }
        EnvCmd::Gc { keep, older_than_days, store } => {
            if keep.is_none() && older_than_days.is_none() {
                bail!("say what to keep: --keep N and/or --older-than-days D");
            }
            let older_than = match older_than_days {
                Some(d) if d.is_finite() && d >= 0.0 => Some(Duration::from_secs_f64(d * 86400.0)),
                Some(d) => bail!("--older-than-days {d} is not a number of days"),
                None => None,
            };
            let removed = store.open()?.gc(GcPolicy { keep, older_than })?;
            for key in &removed {
                println!("removed {key}");
            }
            eprintln!("{} environment(s) removed", removed.len());
            Ok(())
        }
    }
}

/// `NAME==1.0` → (`NAME`, `==1.0`); `NAME` → (`NAME`, any version). The store validates both.
fn split_requirement(arg: &str) -> (String, String) {
    match arg.find(['=', '<', '>', '!', '~']) {
        Some(i) => (arg[..i].trim().to_string(), arg[i..].trim().to_string()),
        None => (arg.trim().to_string(), String::new()),
    }
}

/// Ensures the environment with a spinner on stderr naming the phase.
fn build(store: &Store, spec: &EnvSpec) -> Result<Env> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    bar.enable_steady_tick(Duration::from_millis(100));
    bar.set_message("looking up");
    let start = Instant::now();
    let built = std::cell::Cell::new(false);
    let result = store.ensure(spec, &|p| {
        let msg = match p {
            Progress::Waiting => "waiting for another build of this environment".to_string(),
            Progress::Resolving { python } => format!("resolving (Python {python})"),
            Progress::Installing { packages } => {
                built.set(true);
                format!("installing {packages} packages")
            }
        };
        bar.set_message(msg);
    });
    bar.finish_and_clear();
    let env = result?;
    let how = if built.get() { "built" } else { "found" };
    eprintln!("{how} environment {} in {:.2} s", env.key, start.elapsed().as_secs_f64());
    Ok(env)
}

fn env_json(e: &Env, last_used: Option<SystemTime>) -> serde_json::Value {
    serde_json::json!({
        "key": e.key,
        "path": e.path,
        "python": e.python,
        "python_version": e.python_version,
        "base_prefix": e.base_prefix,
        "site_packages": e.site_packages,
        "spec": e.spec,
        "lock": e.lock.lines().collect::<Vec<_>>(),
        "last_used_unix": last_used.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
    })
}

fn ago(t: Option<SystemTime>) -> String {
    let Some(secs) = t.and_then(|t| SystemTime::now().duration_since(t).ok()).map(|d| d.as_secs()) else {
        return "-".to_string();
    };
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}
