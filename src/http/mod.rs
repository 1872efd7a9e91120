//! The HTTP front: the listener, the route table, and thin handlers that call the pull path and
//! turn its answers (and errors) into responses. Only this module speaks HTTP.

pub mod access;
pub mod answers;
pub mod body;
pub mod cluster;
pub mod conn;
pub mod fast;
pub mod headers;
pub mod ops;
pub mod page;
pub mod prewarm;
pub mod pull;
pub mod push;
pub mod rewind;
pub mod route;
pub mod server;
pub mod tls;
pub mod token;
