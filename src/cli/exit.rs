//! The exit codes `callq` uses, one meaning each across its commands.

use callq_schemas::Outcome;

/// The call ended `error` (`callq call`); the cancel was refused, the call
/// left traces (`callq cancel`); the command failed (others).
pub(crate) const ERROR: u8 = 1;
/// The call ended `fatal`.
pub(crate) const FATAL: u8 = 2;
/// The call ended `expired`; the call had finished already (`callq
/// cancel`).
pub(crate) const EXPIRED: u8 = 3;
/// No answer at all: the broker or the coordinator could not be reached,
/// or the call could not be published.
pub(crate) const NO_ANSWER: u8 = 4;
/// The call ended `cancelled`.
pub(crate) const CANCELLED: u8 = 5;
/// The command line is wrong: an unknown flag, a missing argument, a
/// malformed value (JSON arguments that are not JSON, an id that is not a
/// UUID). Nothing was sent.
pub(crate) const USAGE: u8 = 64;

/// The exit code of a call's outcome.
pub(crate) fn of(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Ok => 0,
        Outcome::Error => ERROR,
        Outcome::Fatal => FATAL,
        Outcome::Expired => EXPIRED,
        Outcome::Cancelled => CANCELLED,
    }
}
