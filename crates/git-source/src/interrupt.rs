//! Stopping a running fetch from another thread.
//!
//! A fetch runs on a blocking thread and holds its mirror's fetch lock throughout. Dropping the
//! future that waits for it (a timeout firing) does not stop that thread: a fetch blocked in a
//! read from a silent server would hold the lock forever, and every later fetch and the removal
//! of the project would queue behind it. [`FetchInterrupt`] reaches into the fetch instead: it
//! sets the flag gix checks between protocol steps and while receiving a pack, and shuts down
//! the sockets the fetch registered, so a read blocked in one returns at once.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A handle that stops one fetch ([`crate::Mirror::fetch_interruptible`]); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FetchInterrupt {
    inner: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    flag: AtomicBool,
    /// Clones of the fetch's connections; shutting one down ends a read blocked in the other.
    sockets: Mutex<Vec<TcpStream>>,
}

impl FetchInterrupt {
    /// A handle for a fetch not yet started.
    pub fn new() -> FetchInterrupt {
        FetchInterrupt::default()
    }

    /// Stops the fetch: it fails soon after (at once if it waits on a registered socket) and
    /// releases the mirror's fetch lock. A fetch that already ended is unaffected.
    pub fn interrupt(&self) {
        // The flag first: `register` checks it under the same lock, so a socket registered
        // concurrently is either drained here or shut down by `register` itself.
        self.inner.flag.store(true, Ordering::SeqCst);
        let sockets = std::mem::take(&mut *self.sockets());
        for socket in sockets {
            // Already closed by the fetch is fine: there is nothing left to stop.
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Whether [`FetchInterrupt::interrupt`] was called.
    pub fn is_interrupted(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// The flag gix checks during a fetch.
    pub(crate) fn flag(&self) -> &AtomicBool {
        &self.inner.flag
    }

    /// Shuts `socket` down when the fetch is interrupted (at once if it already was).
    pub(crate) fn register(&self, socket: &TcpStream) -> std::io::Result<()> {
        let clone = socket.try_clone()?;
        let mut sockets = self.sockets();
        if self.is_interrupted() {
            let _ = clone.shutdown(Shutdown::Both);
        } else {
            sockets.push(clone);
        }
        Ok(())
    }

    fn sockets(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        self.inner
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Interrupts the fetch when dropped: the future waiting for a fetch owns one, so a fetch
/// nobody waits for any more (timed out, or the project's task was cancelled) stops too.
#[derive(Debug)]
pub(crate) struct InterruptOnDrop(pub(crate) FetchInterrupt);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        self.0.interrupt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn interrupt_ends_a_read_blocked_on_a_silent_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (_silent_server, _) = listener.accept().expect("accept");
        let interrupt = FetchInterrupt::new();
        interrupt.register(&client).expect("register");
        let stopper = interrupt.clone();
        let reader = std::thread::spawn(move || client.read(&mut [0u8; 16]));
        stopper.interrupt();
        // Returns (end of stream) rather than blocking, though the server never wrote.
        let read = reader.join().expect("reader thread");
        assert_eq!(read.expect("read"), 0);
        assert!(interrupt.is_interrupted());
    }

    #[test]
    fn a_socket_registered_after_the_interrupt_is_shut_down_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (_silent_server, _) = listener.accept().expect("accept");
        let interrupt = FetchInterrupt::new();
        interrupt.interrupt();
        interrupt.register(&client).expect("register");
        assert_eq!(client.read(&mut [0u8; 16]).expect("read"), 0);
    }
}
