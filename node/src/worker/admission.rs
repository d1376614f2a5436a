//! Places of concurrency keys: the gate's `admit` requests, gathered into
//! one request to the coordinator while the previous one is answered (so
//! that the batches grow with the load, like the coordinator's group
//! commits), with the places of calls that ended since given back in the
//! same request (`vacate`), or alone when nothing asks.

use std::collections::HashSet;
use std::sync::Arc;

use callq_schemas::protocol::{AnswerBody, KeyedCall, MAX_ADMIT_CALLS, RequestBody};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::shared::Shared;
use crate::link::Link;

/// Bodies one `admit` carries at most, in bytes (beyond the first call's).
const BATCH_BYTES: usize = 256 * 1024;

/// A call that asks, and who waits for the answer: `Some(admitted)`, or
/// `None` when the coordinator did not answer.
pub(super) type Asking = (KeyedCall, oneshot::Sender<Option<bool>>);

/// Sends the `admit` and `vacate` requests until the channel closes.
pub(super) async fn run(shared: Arc<Shared>, link: Arc<Link>, mut rx: mpsc::Receiver<Asking>) {
    let worker = shared.opts.worker_id.clone();
    loop {
        tokio::select! {
            first = rx.recv() => {
                let Some(first) = first else { return };
                let mut bytes = first.0.body.len();
                let mut batch = vec![first];
                while batch.len() < MAX_ADMIT_CALLS && bytes < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(next) => {
                            bytes += next.0.body.len();
                            batch.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let vacate = shared.take_vacated();
                let (calls, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let asked = link
                    .ask(|req_id| RequestBody::Admit {
                        req_id,
                        calls: calls.clone(),
                        vacate: vacate.clone(),
                    })
                    .await;
                let admitted: Option<HashSet<_>> = match asked {
                    Ok(AnswerBody::Admission { admitted, .. }) => Some(admitted.into_iter().collect()),
                    Ok(other) => {
                        warn!(%worker, "unexpected answer to admit: {other:?}");
                        None
                    }
                    Err(e) => {
                        warn!(%worker, calls = calls.len(), "admit not answered, returning the calls to their queues: {e}");
                        None
                    }
                };
                for (call, waiter) in calls.iter().zip(waiters) {
                    let answer = admitted.as_ref().map(|a| a.contains(&call.lease.call_id));
                    let _ = waiter.send(answer);
                }
            }
            () = shared.vacated_ready.notified() => {
                let calls = shared.take_vacated();
                if !calls.is_empty()
                    && let Err(e) = link.send(RequestBody::Vacate { calls }).await
                {
                    warn!(%worker, "places of keyed calls not given back (the coordinator takes them back when heartbeats stop listing the calls): {e}");
                }
            }
        }
    }
}
