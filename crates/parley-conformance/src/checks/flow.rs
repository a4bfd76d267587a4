//! placeholder
use super::Kit;
use crate::report::{Outcome, Report};
use parley_proto::UserId;
use std::io::Write;

pub const STEPS: [&str; 1] = ["flow.consent"];

pub async fn run<W: Write>(
    _kit: &mut Kit,
    _user: &UserId,
    report: &mut Report<'_, W>,
) -> std::io::Result<()> {
    report.record("flow.consent", Outcome::skip("todo"))
}
