//! rlsproxy: a PostgreSQL wire-protocol proxy that takes a JWT as the
//! password and hands the client an upstream session whose row-level
//! security sees the token's verified claims.
//!
//! The life of a connection, one module per stage:
//!
//! 1. [`listener`] accepts it and spawns [`connection::handle`].
//! 2. [`startup`] answers SSLRequest/GSSENCRequest, reads the StartupMessage
//!    (through [`prefetch`], one `recv` per packet)
//!    or a CancelRequest (handed to [`cancel`]).
//! 3. [`auth`] verifies the token against the issuer's cached JWKS.
//! 4. [`upstream`] lends a connection logged in as the role itself.
//! 5. [`session`] sets the claims (pg_session_jwt or GUC) and the client's
//!    settings; on release it resets the connection.
//! 6. [`relay`] passes messages both ways until the client leaves.
//!
//! [`config`], [`error`] and [`wire`] are leaves used by every stage.

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod config;
pub mod connection;
pub mod demo;
pub mod devissuer;
pub mod error;
pub mod listener;
pub mod prefetch;
pub mod relay;
pub mod session;
pub mod startup;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod wire;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
