//! quiver-envs: the environments Python functions run in.
//!
//! `store` resolves an environment spec (a Python version plus pip requirements) with uv and
//! builds it once into a content-addressed folder, with packages hard-linked from one shared
//! cache.

pub mod store;

pub use store::{Env, EnvSpec, GcPolicy, Progress, Store, StoreError, StoreOptions};
