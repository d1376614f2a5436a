//! The checks: how every call ended and what its effects left, against the
//! contract. Pure: the run collects what it saw, this judges it.

use std::collections::{BTreeMap, HashMap};

use callq_schemas::codes;
use callq_schemas::protocol::EXACT_TRACE;
use callq_schemas::{Outcome, Reply, Uuid};

/// What a call of the workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `echo.sleep`: no effect, no trace.
    Echo,
    /// `mail.send`: one line in the outbox file, under the trace `mail.sent`.
    Mail,
    /// `bank.transfer` between two of the run's accounts, in an exact
    /// PostgreSQL transaction.
    Bank { from: usize, to: usize, cents: i64 },
    /// `counter.add` of `n` on one of the run's sessions.
    Counter { session: usize, n: i64 },
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo.sleep",
            Kind::Mail => "mail.send",
            Kind::Bank { .. } => "bank.transfer",
            Kind::Counter { .. } => "counter.add",
        }
    }
}

/// One call the run published (confirmed or not).
#[derive(Debug, Clone)]
pub(super) struct Sent {
    pub(super) call_id: Uuid,
    pub(super) kind: Kind,
    /// Whether the broker confirmed the publish.
    pub(super) confirmed: bool,
}

/// Everything the run saw at its end.
#[derive(Debug, Default)]
pub(super) struct Observed {
    pub(super) sent: Vec<Sent>,
    pub(super) replies: HashMap<Uuid, Vec<Reply>>,
    /// Lines in the mail outbox, per call.
    pub(super) mail_lines: HashMap<Uuid, usize>,
    /// The opening balance of every account.
    pub(super) opening: i64,
    /// Each account's balance at the end (empty without `bank`).
    pub(super) balances: Vec<i64>,
    /// Rows in `callq_outbox`, per transfer call.
    pub(super) outbox_rows: HashMap<Uuid, usize>,
    /// Each session's counter at the end (empty without `counter`).
    pub(super) counters: Vec<i64>,
}

/// The figures of a run and what broke the contract.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    pub(super) calls: usize,
    pub(super) by_outcome: BTreeMap<String, usize>,
    /// Confirmed calls that never got an outcome.
    pub(super) lost: usize,
    /// Effects that happened twice (mail lines, outbox rows), and counters
    /// or balances off their acknowledged sum.
    pub(super) doubled: usize,
    /// `fatal` outcomes with no granted non-exact trace.
    pub(super) fatal_without_trace: usize,
    /// The calls answered `fatal` for a granted trace, with the traces.
    pub(super) fatal_with_trace: Vec<(Uuid, Vec<String>)>,
    /// Calls answered by an attempt above 1.
    pub(super) retried: usize,
    /// Calls answered more than once (always with the same outcome).
    pub(super) duplicate_replies: usize,
    /// Publishes the broker did not confirm (not counted as calls).
    pub(super) unconfirmed: usize,
    /// Calls answered `delivery_limit`: their deliveries used up by the
    /// faults (each lost with its worker), none completed.
    pub(super) delivery_limit: usize,
    pub(super) violations: Vec<String>,
}

impl Verdict {
    pub(super) fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Judges what the run saw.
pub(super) fn judge(seen: &Observed) -> Verdict {
    let mut v = Verdict::default();
    let mut counted: HashMap<usize, (i64, i64)> = HashMap::new();
    let mut moved = vec![0i64; seen.balances.len()];
    for sent in &seen.sent {
        let replies = seen.replies.get(&sent.call_id);
        if !sent.confirmed && replies.is_none() {
            v.unconfirmed += 1;
            // It may still have run: its transfer counts where it left a row.
            if let Kind::Bank { from, to, cents } = sent.kind
                && seen.outbox_rows.contains_key(&sent.call_id)
            {
                transfer(&mut moved, from, to, cents);
            }
            continue;
        }
        v.calls += 1;
        let Some(first) = replies.and_then(|r| r.first()) else {
            // What a lost call did is unknown: its committed transfer
            // counts, its add may have.
            match sent.kind {
                Kind::Bank { from, to, cents } if seen.outbox_rows.contains_key(&sent.call_id) => {
                    transfer(&mut moved, from, to, cents);
                }
                Kind::Counter { session, n } => counted.entry(session).or_default().1 += n,
                _ => {}
            }
            v.lost += 1;
            v.violations.push(format!(
                "call {} ({}) was confirmed and got no outcome: lost",
                sent.call_id,
                sent.kind.name()
            ));
            continue;
        };
        let replies = replies.map_or(&[][..], Vec::as_slice);
        one_outcome(&mut v, sent, replies);
        *v.by_outcome
            .entry(first.outcome.as_str().to_owned())
            .or_default() += 1;
        if replies.iter().any(|r| r.attempt > 1) {
            v.retried += 1;
        }
        fatal(&mut v, sent, first);
        effects(&mut v, seen, sent, first, &mut moved, &mut counted);
    }
    balances(&mut v, seen, &moved);
    counters(&mut v, seen, &counted);
    v
}

fn transfer(moved: &mut [i64], from: usize, to: usize, cents: i64) {
    if let (Some(_), Some(_)) = (moved.get(from), moved.get(to)) {
        moved[from] -= cents;
        moved[to] += cents;
    }
}

/// Every reply of a call carries the same outcome.
fn one_outcome(v: &mut Verdict, sent: &Sent, replies: &[Reply]) {
    v.duplicate_replies += replies.len().saturating_sub(1);
    let first = &replies[0];
    if let Some(other) = replies.iter().find(|r| r.outcome != first.outcome) {
        v.violations.push(format!(
            "call {} ({}) ended twice: {} (attempt {}) and {} (attempt {})",
            sent.call_id,
            sent.kind.name(),
            first.outcome,
            first.attempt,
            other.outcome,
            other.attempt
        ));
    }
}

/// `fatal` only where a non-exact trace was granted.
fn fatal(v: &mut Verdict, sent: &Sent, reply: &Reply) {
    if reply.outcome != Outcome::Fatal {
        return;
    }
    let traces = reply
        .error
        .as_ref()
        .map(|e| e.traces.clone())
        .unwrap_or_default();
    if traces.iter().any(|t| t != EXACT_TRACE) {
        v.fatal_with_trace.push((sent.call_id, traces));
    } else {
        v.fatal_without_trace += 1;
        v.violations.push(format!(
            "call {} ({}) ended fatal without a granted non-exact trace (traces {traces:?})",
            sent.call_id,
            sent.kind.name()
        ));
    }
}

/// The effect a call left, against its outcome.
fn effects(
    v: &mut Verdict,
    seen: &Observed,
    sent: &Sent,
    reply: &Reply,
    moved: &mut [i64],
    counted: &mut HashMap<usize, (i64, i64)>,
) {
    let id = sent.call_id;
    let code = reply.error.as_ref().map_or("", |e| e.code.as_str());
    let unexpected = |v: &mut Verdict| {
        v.violations.push(format!(
            "call {id} ({}) ended {} {code}: not an outcome this call can have",
            sent.kind.name(),
            reply.outcome
        ));
    };
    match (sent.kind, reply.outcome) {
        (Kind::Echo, Outcome::Ok)
        | (Kind::Echo | Kind::Mail | Kind::Bank { .. }, Outcome::Fatal) => {}
        (Kind::Mail, Outcome::Ok) => {}
        (Kind::Bank { from, to, cents }, Outcome::Ok) => transfer(moved, from, to, cents),
        (Kind::Bank { .. }, Outcome::Error) if code == "insufficient_funds" => {}
        (Kind::Counter { session, n }, Outcome::Ok) => counted.entry(session).or_default().0 += n,
        // A fatal add may or may not have counted.
        (Kind::Counter { session, n }, Outcome::Fatal) => {
            counted.entry(session).or_default().1 += n;
        }
        (Kind::Counter { .. }, Outcome::Error) if code == "session_conflict" => {}
        // Its deliveries used up under faults: never completed, so nothing
        // of it may show (checked below: no mail line, no outbox row, not
        // counted).
        (_, Outcome::Error) if code == codes::DELIVERY_LIMIT => v.delivery_limit += 1,
        _ => unexpected(v),
    }
    match sent.kind {
        Kind::Mail => {
            let lines = seen.mail_lines.get(&id).copied().unwrap_or(0);
            if lines > 1 {
                v.doubled += 1;
                v.violations
                    .push(format!("mail of call {id} was sent {lines} times"));
            } else if lines == 0 && reply.outcome == Outcome::Ok {
                v.violations
                    .push(format!("mail of call {id} was answered ok and not sent"));
            } else if lines > 0 && reply.outcome == Outcome::Error {
                v.violations
                    .push(format!("mail of call {id} was answered {code} and sent"));
            }
        }
        Kind::Bank { .. } => {
            let rows = seen.outbox_rows.get(&id).copied().unwrap_or(0);
            let want = usize::from(reply.outcome == Outcome::Ok);
            if rows != want {
                if rows > want {
                    v.doubled += 1;
                }
                v.violations.push(format!(
                    "transfer {id} ended {} with {rows} outbox rows, not {want}",
                    reply.outcome
                ));
            }
        }
        Kind::Echo | Kind::Counter { .. } => {}
    }
}

/// Each account holds its opening balance plus what the transfers that
/// committed moved.
fn balances(v: &mut Verdict, seen: &Observed, moved: &[i64]) {
    let opening = seen.opening;
    for (i, (have, moved)) in seen.balances.iter().zip(moved).enumerate() {
        if *have != opening + moved {
            v.doubled += 1;
            v.violations.push(format!(
                "account {i} holds {have} cents, not {} (opening {opening}, committed transfers {moved:+})",
                opening + moved
            ));
        }
    }
    let total: i64 = seen.balances.iter().sum();
    let want = opening * i64::try_from(seen.balances.len()).unwrap_or(i64::MAX);
    if total != want {
        v.violations.push(format!(
            "the accounts hold {total} cents in all, not {want}: money was made or lost"
        ));
    }
}

/// Each counter is the sum of its acknowledged adds (plus, at most, the
/// adds answered `fatal`).
fn counters(v: &mut Verdict, seen: &Observed, counted: &HashMap<usize, (i64, i64)>) {
    for (session, have) in seen.counters.iter().enumerate() {
        let (ok, maybe) = counted.get(&session).copied().unwrap_or_default();
        if *have < ok || *have > ok + maybe {
            v.doubled += 1;
            let range = if maybe == 0 {
                ok.to_string()
            } else {
                format!("{ok}..={}", ok + maybe)
            };
            v.violations.push(format!(
                "counter of session {session} is {have}, not the sum of its acknowledged adds ({range})"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use callq_schemas::ErrorBody;

    fn reply(id: Uuid, outcome: Outcome, attempt: u32, traces: &[&str]) -> Reply {
        let mut r = Reply::ok(id, attempt, serde_json::json!({}));
        r.outcome = outcome;
        if outcome != Outcome::Ok {
            r.result = None;
            r.error = Some(ErrorBody {
                code: "x".into(),
                message: "m".into(),
                traces: traces.iter().map(|t| (*t).to_owned()).collect(),
            });
        }
        r
    }

    fn sent(kind: Kind) -> Sent {
        Sent {
            call_id: Uuid::now_v7(),
            kind,
            confirmed: true,
        }
    }

    fn one(seen: &mut Observed, kind: Kind, outcome: Outcome, traces: &[&str]) -> Uuid {
        let s = sent(kind);
        let id = s.call_id;
        seen.replies.insert(id, vec![reply(id, outcome, 1, traces)]);
        seen.sent.push(s);
        id
    }

    /// Two accounts opened with 100 cents each.
    fn observed(balances: Vec<i64>, counters: Vec<i64>) -> Observed {
        Observed {
            opening: 100,
            balances,
            counters,
            ..Observed::default()
        }
    }

    const TEN: Kind = Kind::Bank {
        from: 0,
        to: 1,
        cents: 10,
    };

    const ADD5: Kind = Kind::Counter { session: 0, n: 5 };

    #[test]
    fn a_clean_run_passes_with_its_figures() {
        let mut seen = observed(vec![90, 110], vec![5]);
        one(&mut seen, Kind::Echo, Outcome::Ok, &[]);
        let m = one(&mut seen, Kind::Mail, Outcome::Ok, &[]);
        seen.mail_lines.insert(m, 1);
        let f = one(&mut seen, Kind::Mail, Outcome::Fatal, &["mail.sent"]);
        seen.mail_lines.insert(f, 1);
        let t = one(&mut seen, TEN, Outcome::Ok, &[]);
        seen.outbox_rows.insert(t, 1);
        one(&mut seen, ADD5, Outcome::Ok, &[]);
        let v = judge(&seen);
        assert!(v.passed(), "{:?}", v.violations);
        assert_eq!((v.calls, v.lost, v.doubled), (5, 0, 0));
        assert_eq!(v.fatal_with_trace.len(), 1);
        assert_eq!(v.by_outcome["ok"], 4);
    }

    #[test]
    fn each_broken_promise_is_named() {
        let mut seen = observed(vec![80, 110], vec![7]);
        // Lost: confirmed, no reply.
        let lost = sent(Kind::Echo);
        seen.sent.push(lost);
        // A mail sent twice.
        let m = one(&mut seen, Kind::Mail, Outcome::Ok, &[]);
        seen.mail_lines.insert(m, 2);
        // Fatal with an exact trace only.
        let t = one(&mut seen, TEN, Outcome::Fatal, &[EXACT_TRACE]);
        seen.outbox_rows.insert(t, 1);
        // A counter off its sum.
        one(&mut seen, ADD5, Outcome::Ok, &[]);
        // Contradicting replies.
        let c = sent(Kind::Echo);
        let id = c.call_id;
        seen.replies.insert(
            id,
            vec![
                reply(id, Outcome::Ok, 1, &[]),
                reply(id, Outcome::Error, 2, &[]),
            ],
        );
        seen.sent.push(c);
        let v = judge(&seen);
        assert_eq!(v.lost, 1);
        assert_eq!(v.fatal_without_trace, 1);
        let all = v.violations.join("\n");
        for needle in [
            "lost",
            "sent 2 times",
            "without a granted non-exact trace",
            "not the sum of its acknowledged adds",
            "ended twice",
            "holds 80 cents, not 100",
            "money was made or lost",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
    }

    #[test]
    fn a_call_out_of_deliveries_must_have_left_nothing() {
        let mut seen = observed(vec![100, 100], vec![0]);
        for kind in [Kind::Mail, TEN, ADD5] {
            let id = one(&mut seen, kind, Outcome::Error, &[]);
            if let Some(r) = seen.replies.get_mut(&id) {
                r[0].error.as_mut().unwrap().code = codes::DELIVERY_LIMIT.into();
            }
        }
        let v = judge(&seen);
        assert!(v.passed(), "{:?}", v.violations);
        assert_eq!(v.delivery_limit, 3);
        // One that left its mail line breaks the promise.
        let mail = seen.sent[0].call_id;
        seen.mail_lines.insert(mail, 1);
        assert!(judge(&seen).violations[0].contains("answered delivery_limit and sent"));
    }

    #[test]
    fn an_unconfirmed_call_is_not_lost_but_its_committed_transfer_counts() {
        let mut seen = observed(vec![95, 105], Vec::new());
        let mut s = sent(Kind::Bank {
            from: 0,
            to: 1,
            cents: 5,
        });
        s.confirmed = false;
        seen.outbox_rows.insert(s.call_id, 1);
        seen.sent.push(s);
        let v = judge(&seen);
        assert!(v.passed(), "{:?}", v.violations);
        assert_eq!((v.calls, v.unconfirmed), (0, 1));
    }
}
