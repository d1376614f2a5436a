//! The RabbitMQ node of the tests that stop, restart or cut a broker
//! (`scripts/rabbitmq-node`, which scripts/services starts), apart from the
//! node the other tests share, and a virtual host of one test on it.

use std::path::Path;
use std::process::Command;

use uuid::Uuid;

/// The RabbitMQ node these tests may stop and restart.
pub struct FaultNode {
    /// Its Erlang node name.
    pub name: String,
    /// Its AMQP port.
    pub port: String,
}

impl FaultNode {
    pub fn get() -> Self {
        let name = std::env::var("CALLQ_FAULTS_NODE").expect(
            "CALLQ_FAULTS_NODE is not set: run scripts/test, or `scripts/rabbitmq-node start` and export what `scripts/rabbitmq-node env` prints",
        );
        let port = std::env::var("CALLQ_FAULTS_PORT").unwrap_or_else(|_| "5673".into());
        Self { name, port }
    }

    /// `rabbitmqctl -n <node> args..`; what it printed.
    pub fn ctl(&self, args: &[&str]) -> String {
        super::rabbitmqctl(&[&["-n", self.name.as_str()], args].concat())
    }

    /// `scripts/rabbitmq-node <cmd>`: start, stop, stop_app, start_app.
    pub fn script(&self, cmd: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-node");
        let status = Command::new(script).arg(cmd).status().unwrap();
        assert!(status.success(), "scripts/rabbitmq-node {cmd} failed");
    }
}

/// A virtual host of one test on the fault node; deleted when dropped.
pub struct FaultVhost {
    pub node: FaultNode,
    pub name: String,
    /// `amqp://guest:guest@127.0.0.1:<port>/<name><query>`.
    pub url: String,
    query: String,
    /// A user of its own, for connections from off the loopback.
    user: Option<(String, String)>,
}

impl FaultVhost {
    pub fn create(tag: &str, query: &str) -> Self {
        let node = FaultNode::get();
        let run = std::env::var("CALLQ_TEST_RUN").unwrap_or_else(|_| "manual".into());
        let name = format!("callq-test-{run}-{tag}-{}", Uuid::now_v7().simple());
        node.ctl(&["add_vhost", &name]);
        node.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("amqp://guest:guest@127.0.0.1:{}/{name}{query}", node.port);
        Self {
            node,
            name,
            url,
            query: query.to_owned(),
            user: None,
        }
    }

    /// The name of the vhost's own user, once [`FaultVhost::url_at`] made it.
    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|(u, _)| u.as_str())
    }

    /// The vhost's URL at `host` (a namespace's view of the host), with a
    /// user of its own (a random password): RabbitMQ lets guest in over
    /// loopback only. The user is deleted with the vhost.
    pub fn url_at(&mut self, host: &str) -> String {
        let (user, password) = self
            .user
            .get_or_insert_with(|| {
                let user = format!("{}-user", self.name);
                let password = Uuid::now_v7().simple().to_string();
                self.node.ctl(&["add_user", &user, &password]);
                self.node
                    .ctl(&["set_permissions", "-p", &self.name, &user, ".*", ".*", ".*"]);
                (user, password)
            })
            .clone();
        format!(
            "amqp://{user}:{password}@{host}:{}/{}{}",
            self.node.port, self.name, self.query
        )
    }
}

impl Drop for FaultVhost {
    fn drop(&mut self) {
        if let Some((user, _)) = &self.user {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "-n", &self.node.name, "delete_user", user])
                .output();
        }
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node.name, "delete_vhost", &self.name])
            .output();
    }
}
