//! One file per subcommand.

pub mod agent;
pub mod bench;
pub mod classify;
pub mod gpio;
pub mod launch;
pub mod run;
pub mod trust;
