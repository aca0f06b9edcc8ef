//! openraft's async runtime: tokio, with a random number generator that a simulation can seed.
//!
//! openraft draws each election timeout from its runtime's thread-local RNG. With
//! `openraft::TokioRuntime` that is `rand::thread_rng()`, seeded from the OS, so no simulation of
//! a region could ever replay the same elections twice. [`MeridianRuntime`] is tokio in every
//! other respect; its RNG is a per-thread `StdRng` seeded from the OS unless a deterministic
//! simulation calls [`seed_thread_rng`] on the one thread it runs every node on.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes this thread's Raft RNG (election timeouts) a deterministic function of `seed`.
pub fn seed_thread_rng(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

fn with_rng<T>(f: impl FnOnce(&mut StdRng) -> T) -> T {
    RNG.with(|r| f(r.borrow_mut().get_or_insert_with(StdRng::from_entropy)))
}

/// A handle on the current thread's Raft RNG.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftRng;

impl RngCore for RaftRng {
    fn next_u32(&mut self) -> u32 {
        with_rng(|r| r.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        with_rng(|r| r.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        with_rng(|r| r.fill_bytes(dest))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        with_rng(|r| r.try_fill_bytes(dest))
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct MeridianRuntime;

impl AsyncRuntime for MeridianRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = RaftRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        RaftRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn a_seed_fixes_the_sequence() {
        let draw = || -> Vec<u64> {
            let mut r = MeridianRuntime::thread_rng();
            (0..8).map(|_| r.gen_range(800..1600)).collect()
        };
        seed_thread_rng(7);
        let a = draw();
        seed_thread_rng(7);
        assert_eq!(a, draw());
        seed_thread_rng(8);
        assert_ne!(a, draw());
    }
}
