//! The operator's handle on the cluster: status, drain and cancel, through
//! the coordinator.

use std::sync::Arc;
use std::time::Duration;

use callq_broker::Broker;
use callq_schemas::protocol::{AnswerBody, CancelDecision, ClusterStatus, RequestBody};
use tokio::sync::mpsc;

use crate::Error;
use crate::link::{Link, Order};

/// Asks the coordinator about the cluster and gives it orders.
pub struct Admin {
    link: Arc<Link>,
    _orders: mpsc::Receiver<Order>,
}

impl Admin {
    /// Connects through `broker`; each request waits up to `patience` for the
    /// coordinator's answer.
    pub async fn connect(broker: Arc<dyn Broker>, patience: Duration) -> Result<Self, Error> {
        let id = format!("admin-{}", uuid::Uuid::now_v7().simple());
        let queue = format!("callq.admin.{id}");
        let (link, orders) = Link::connect(broker, &id, queue, patience).await?;
        Ok(Self {
            link,
            _orders: orders,
        })
    }

    /// The cluster as the coordinator sees it.
    pub async fn status(&self) -> Result<ClusterStatus, Error> {
        match self.link.ask(|req_id| RequestBody::Status { req_id }).await {
            Ok(AnswerBody::Status { status, .. }) => Ok(status),
            Ok(other) => Err(Error::Protocol(format!("{other:?}"))),
            Err(e) => Err(Error::Timeout(e.0)),
        }
    }

    /// Asks `worker` to drain and leave; `false` if the coordinator does not
    /// know it.
    pub async fn drain(&self, worker: &str) -> Result<bool, Error> {
        let asked = self
            .link
            .ask(|req_id| RequestBody::Drain {
                req_id,
                worker: worker.to_owned(),
            })
            .await;
        match asked {
            Ok(AnswerBody::Draining { found, .. }) => Ok(found),
            Ok(other) => Err(Error::Protocol(format!("{other:?}"))),
            Err(e) => Err(Error::Timeout(e.0)),
        }
    }

    /// Cancels a call: see [`CancelDecision`] for what the coordinator
    /// answers. A call not started yet never runs and is answered
    /// `cancelled`; one that runs is revoked at its next trace and answered
    /// `cancelled`; one that left a trace is not cancelled.
    pub async fn cancel(&self, call_id: uuid::Uuid) -> Result<CancelDecision, Error> {
        match self
            .link
            .ask(|req_id| RequestBody::Cancel { req_id, call_id })
            .await
        {
            Ok(AnswerBody::Cancel { decision, .. }) => Ok(decision),
            Ok(other) => Err(Error::Protocol(format!("{other:?}"))),
            Err(e) => Err(Error::Timeout(e.0)),
        }
    }
}
