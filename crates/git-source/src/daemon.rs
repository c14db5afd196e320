//! Fetching over `git://`: the connection to a Git daemon, opened here rather than by gix so it
//! has a read timeout and can be interrupted.
//!
//! gix's own `git://` connector opens a `TcpStream` with no read timeout and keeps it to
//! itself: a daemon that accepts and then says nothing (a half-open connection, a hung server)
//! blocks the fetch forever. Here the stream times out when it stays silent for
//! [`IDLE_TIMEOUT`], and it is registered with the fetch's [`FetchInterrupt`], which shuts it
//! down when the fetch's own deadline passes.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::Transport;
use gix::protocol::transport::client::git;

use crate::error::FetchError;
use crate::interrupt::FetchInterrupt;
use crate::remote::Remote;

/// gix's own `git://` connect timeout, kept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A daemon building a pack sends keep-alive packets every few seconds (`uploadpack.keepAlive`,
/// 5 s by default), so a minute without a byte means the connection is dead.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

const DEFAULT_PORT: u16 = 9418;

/// Connects to the daemon of `remote` (a `git://` remote) for one fetch.
pub(crate) fn transport(
    remote: &Remote,
    interrupt: &FetchInterrupt,
) -> Result<Box<dyn Transport + Send>, FetchError> {
    let name = remote.to_string();
    let other = |detail: String| FetchError::Other {
        remote: name.clone(),
        detail,
    };
    let unreachable = |detail: String| FetchError::Unreachable {
        remote: name.clone(),
        detail,
    };
    let url = gix::url::parse(gix::bstr::BStr::new(remote.transport_url().as_bytes()))
        .map_err(|e| other(format!("invalid git:// remote: {e}")))?;
    let host = url
        .host()
        .ok_or_else(|| other("the git:// remote has no host".to_owned()))?
        .to_owned();
    let port = url.port.unwrap_or(DEFAULT_PORT);
    let address = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("could not resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| unreachable(format!("{host} has no address")))?;
    let read = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
        .map_err(|e| unreachable(format!("could not connect to {address}: {e}")))?;
    let io_err = |e: std::io::Error| other(format!("setting up the connection: {e}"));
    read.set_read_timeout(Some(IDLE_TIMEOUT)).map_err(io_err)?;
    read.set_write_timeout(Some(IDLE_TIMEOUT)).map_err(io_err)?;
    interrupt.register(&read).map_err(io_err)?;
    let write = read.try_clone().map_err(io_err)?;
    let connection = git::blocking_io::Connection::new(
        read,
        write,
        gix::protocol::transport::Protocol::V2,
        url.path,
        Some((host, url.port)),
        git::ConnectMode::Daemon,
        false,
    );
    Ok(Box::new(connection))
}
