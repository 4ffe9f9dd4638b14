//! quiver-envs: the environments Python functions run in.
//!
//! `store` resolves an environment spec (a Python version plus pip requirements) with uv and
//! builds it once into a content-addressed folder, with packages hard-linked from one shared
//! cache. `zygote` keeps a pre-imported Python process per environment and forks each
//! function call from it.

pub mod store;
pub mod zygote;

pub use store::{Env, EnvSpec, GcPolicy, Progress, Store, StoreError, StoreOptions};
pub use zygote::{ForkRequest, Forked, ZygoteError, ZygoteOptions, ZygotePool, binds};
