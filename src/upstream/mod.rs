//! Upstream side: logging in to Postgres as the target role and pooling
//! those connections per (database, role).

pub mod connect;
pub mod params;
pub mod pool;
pub mod stream;
