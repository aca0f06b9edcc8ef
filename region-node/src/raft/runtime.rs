//! openraft's async runtime: tokio, with a random number generator that a simulation can seed.
//!
//! openraft draws each election timeout from its runtime's thread-local RNG. With
//! `openraft::TokioRuntime` that is `rand::thread_rng()`, seeded from the OS, so no simulation of
//! a region could ever replay the same elections twice. [`MeridianRuntime`] is tokio in every
//! other respect; its RNG is a per-thread `StdRng` seeded from the OS unless a deterministic
//! simulation calls [`seed_thread_rng`] on the one thread it runs every node on.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use openraft_rt_tokio::{TokioMpsc, TokioMutex, TokioOneshot, TokioRuntime};
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

impl rand_core::TryRng for RaftRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(with_rng(|r| r.next_u32()))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(with_rng(|r| r.next_u64()))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Infallible> {
        with_rng(|r| r.fill_bytes(dest));
        Ok(())
    }
}

/// tokio (openraft's own tokio runtime), but for its RNG and its watch channel
/// ([`OrderedWatch`](super::watch::OrderedWatch)), both deterministic in a simulation.
#[derive(Debug)]
pub struct MeridianRuntime(TokioRuntime);

impl AsyncRuntime for MeridianRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = RaftRng;
    type Mpsc = TokioMpsc;
    type Watch = super::watch::OrderedWatch;
    type Oneshot = TokioOneshot;
    type Mutex<T: OptionalSend + 'static> = TokioMutex<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        RaftRng
    }

    fn new(threads: usize) -> Self {
        Self(TokioRuntime::new(threads))
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.0.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use rand_core::Rng;

    use super::*;

    #[test]
    fn a_seed_fixes_the_sequence() {
        let draw = || -> Vec<u64> {
            let mut r = MeridianRuntime::thread_rng();
            (0..8).map(|_| r.next_u64() % 800 + 800).collect()
        };
        seed_thread_rng(7);
        let a = draw();
        seed_thread_rng(7);
        assert_eq!(a, draw());
        seed_thread_rng(8);
        assert_ne!(a, draw());
    }
}
