//! Slots for function processes, handed out by run priority: when every slot is busy, a node of
//! a higher-priority run starts before one of a lower-priority run, and nodes of equal priority
//! start in the order they became ready.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// A fixed number of slots, granted highest priority first.
#[derive(Debug)]
pub struct Slots {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    free: usize,
    seq: u64,
    waiting: BinaryHeap<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    priority: i32,
    seq: u64,
    grant: oneshot::Sender<Slot>,
}

impl PartialEq for Waiter {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiter {
    /// Higher priority first, then earlier arrival.
    fn cmp(&self, o: &Self) -> Ordering {
        self.priority.cmp(&o.priority).then(o.seq.cmp(&self.seq))
    }
}

/// A held slot; dropping it passes it to the best waiter or frees it.
#[derive(Debug)]
pub struct Slot {
    /// None once handed back without releasing (see `release`).
    slots: Option<Arc<Slots>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(s) = self.slots.take() {
            s.release();
        }
    }
}

impl Slots {
    /// `n` slots.
    pub fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots { state: Mutex::new(State { free: n, seq: 0, waiting: BinaryHeap::new() }) })
    }

    /// Waits for a slot. Cancel-safe: a waiter dropped before its grant gives up its place, and
    /// a grant that arrives too late is passed on.
    pub async fn acquire(self: &Arc<Self>, priority: i32) -> Slot {
        let rx = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.free > 0 && st.waiting.is_empty() {
                st.free -= 1;
                return Slot { slots: Some(self.clone()) };
            }
            let (tx, rx) = oneshot::channel();
            st.seq += 1;
            let seq = st.seq;
            st.waiting.push(Waiter { priority, seq, grant: tx });
            rx
        };
        match rx.await {
            Ok(slot) => slot,
            // The sender lives in the heap until granted, so this cannot happen; wait again
            // rather than run without a slot.
            Err(_) => Box::pin(self.acquire(priority)).await,
        }
    }

    fn release(self: &Arc<Self>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(w) = st.waiting.pop() {
            // If the waiter is gone the Slot comes back; disarm it (we hold the lock and are
            // releasing that very slot) and try the next waiter.
            match w.grant.send(Slot { slots: Some(self.clone()) }) {
                Ok(()) => return,
                Err(mut slot) => drop(slot.slots.take()),
            }
        }
        st.free += 1;
    }

    /// Slots free now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn higher_priority_waiters_go_first_equal_ones_in_order() {
        let s = Slots::new(1);
        let held = s.acquire(0).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (name, prio) in [("low", -1), ("mid-a", 0), ("high", 5), ("mid-b", 0)] {
            let (s, tx) = (s.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = s.acquire(prio).await;
                tx.send(name).expect("send");
                drop(slot);
            });
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(rx.recv().await.expect("recv"));
        }
        assert_eq!(order, ["high", "mid-a", "mid-b", "low"]);
        assert_eq!(s.available(), 1);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_lose_the_slot() {
        let s = Slots::new(1);
        let held = s.acquire(0).await;
        let gone = tokio::time::timeout(std::time::Duration::from_millis(10), s.acquire(9)).await;
        assert!(gone.is_err());
        drop(held);
        assert_eq!(s.available(), 1);
        let _again = s.acquire(0).await;
        assert_eq!(s.available(), 0);
    }
}
