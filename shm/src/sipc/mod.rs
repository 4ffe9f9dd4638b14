//! SIPC, the shared-IPC table format: an Arrow table as a small descriptor plus memfd segments.
//! See docs/sipc.md for the byte layout and the rules readers enforce.

pub mod deanon;
pub mod format;
pub mod reader;
pub mod writer;

pub use deanon::{CopyToArena, Deanonymize, KernelMove, KzeroFile, Placement, Reference, Shareable, Way};
pub use format::{BufferRef, Limits, Node, RawDescriptor, Tree, VERSION};
pub use reader::{ReadOptions, SharedMapping, SipcRead, read_table, read_table_trusted};
pub use writer::{SipcTable, TableWriter, WriteStats};
