//! openraft's watch channel, woken in a fixed order.
//!
//! openraft 0.10 wakes its replication tasks through watch channels. tokio's watch spreads its
//! waiters over eight `Notify`s picked at random (an RNG tokio only lets one seed with
//! `tokio_unstable`), so which follower a leader sends to first, and with it every later event
//! of a simulation, changed from run to run. Here waiters wait on one `Notify`, which wakes
//! them in the order they began to wait: the same order for the same seed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::async_runtime::watch::{RecvError, SendError};
use openraft::async_runtime::{Watch, WatchReceiver, WatchSender};
use openraft::{OptionalSend, OptionalSync};
use tokio::sync::Notify;

/// The deterministic watch channel ([`Watch`] for `MeridianRuntime`).
pub struct OrderedWatch;

struct Shared<T> {
    value: RwLock<T>,
    /// Bumped by every change.
    version: AtomicU64,
    senders: AtomicUsize,
    receivers: AtomicUsize,
    changed: Notify,
}

impl<T> Shared<T> {
    fn read(&self) -> RwLockReadGuard<'_, T> {
        self.value.read().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The version this receiver has seen.
    seen: u64,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::SeqCst);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last sender: waiting receivers learn the channel closed.
            self.shared.changed.notify_waiters();
        }
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.shared.receivers.fetch_add(1, Ordering::SeqCst);
        Self {
            shared: self.shared.clone(),
            seen: self.seen,
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.receivers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Watch for OrderedWatch {
    type Sender<T: OptionalSend + OptionalSync> = Sender<T>;
    type Receiver<T: OptionalSend + OptionalSync> = Receiver<T>;
    type Ref<'a, T: OptionalSend + 'a> = RwLockReadGuard<'a, T>;

    fn channel<T: OptionalSend + OptionalSync>(init: T) -> (Sender<T>, Receiver<T>) {
        let shared = Arc::new(Shared {
            value: RwLock::new(init),
            version: AtomicU64::new(0),
            senders: AtomicUsize::new(1),
            receivers: AtomicUsize::new(1),
            changed: Notify::new(),
        });
        (
            Sender {
                shared: shared.clone(),
            },
            Receiver { shared, seen: 0 },
        )
    }
}

impl<T: OptionalSend + OptionalSync> WatchSender<OrderedWatch, T> for Sender<T> {
    /// Like tokio's: refused, and the value kept, when nobody receives.
    fn send(&self, value: T) -> Result<(), SendError<T>> {
        if self.shared.receivers.load(Ordering::SeqCst) == 0 {
            return Err(SendError(value));
        }
        self.send_if_modified(|v| {
            *v = value;
            true
        });
        Ok(())
    }

    fn send_if_modified<F>(&self, modify: F) -> bool
    where
        F: FnOnce(&mut T) -> bool,
    {
        let modified = {
            let mut v = self.shared.value.write().unwrap_or_else(|e| e.into_inner());
            let modified = modify(&mut v);
            if modified {
                self.shared.version.fetch_add(1, Ordering::SeqCst);
            }
            modified
        };
        if modified {
            self.shared.changed.notify_waiters();
        }
        modified
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.shared.read()
    }

    fn subscribe(&self) -> Receiver<T> {
        self.shared.receivers.fetch_add(1, Ordering::SeqCst);
        Receiver {
            shared: self.shared.clone(),
            seen: self.shared.version.load(Ordering::SeqCst),
        }
    }
}

impl<T: OptionalSend + OptionalSync> WatchReceiver<OrderedWatch, T> for Receiver<T> {
    /// Returns once a value this receiver has not seen is there (marking it seen), or fails
    /// once every sender is gone with nothing new.
    async fn changed(&mut self) -> Result<(), RecvError> {
        loop {
            // Registered before the checks, so a change in between still wakes this wait.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let version = self.shared.version.load(Ordering::SeqCst);
            if version != self.seen {
                self.seen = version;
                return Ok(());
            }
            if self.shared.senders.load(Ordering::SeqCst) == 0 {
                return Err(RecvError(()));
            }
            notified.await;
        }
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.shared.read()
    }

    fn borrow_and_update(&mut self) -> RwLockReadGuard<'_, T> {
        let guard = self.shared.read();
        // Read under the lock: a writer bumps the version while holding it.
        self.seen = self.shared.version.load(Ordering::SeqCst);
        guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_are_seen_once_and_a_closed_channel_ends_waits() {
        let (tx, mut rx) = OrderedWatch::channel(1u32);
        let mut late = tx.subscribe();
        assert_eq!(*rx.borrow_watched(), 1);
        tx.send(2).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 2);
        assert!(!tx.send_if_modified(|_| false));
        // Nothing new: a wait lasts until the next change.
        let waiter = tokio::spawn(async move {
            rx.changed().await.unwrap();
            let v = *rx.borrow_watched();
            (rx, v)
        });
        tokio::task::yield_now().await;
        tx.send(3).unwrap();
        let (mut rx, v) = waiter.await.unwrap();
        assert_eq!(v, 3);
        late.changed().await.unwrap();
        assert_eq!(*late.borrow_and_update(), 3);
        drop(tx);
        assert!(rx.changed().await.is_err());
        drop(late);
    }

    #[test]
    fn a_send_without_receivers_is_refused() {
        let (tx, rx) = OrderedWatch::channel(0u8);
        drop(rx);
        assert_eq!(tx.send(5), Err(SendError(5)));
        assert_eq!(*tx.borrow_watched(), 0);
    }

    #[tokio::test]
    async fn waiters_wake_in_the_order_they_waited() {
        let (tx, rx) = OrderedWatch::channel(0u8);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let mut rx = rx.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                rx.changed().await.unwrap();
                order.lock().unwrap().push(i);
            }));
            tokio::task::yield_now().await;
        }
        tx.send(1).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }
}
