//! The black-box MIMI conformance kit (draft-ietf-mimi-protocol-06 as docs/mimi-profile.md reads
//! it): a small MIMI provider for the domain `--as DOMAIN`, with its own federation listener
//! (mutual TLS) and in-memory MLS clients (`kit-alice`, `kit-bob`), that runs checks against a
//! provider under test and prints one line per check (`PASS|FAIL|SKIP name: detail`) and a
//! closing `N passed, M failed, K skipped`.
//!
//! Any operator runs it against their own server: [`run`] with a [`KitConfig`]. Without a
//! cooperating test user (`peer_user`) it checks what needs no cooperation (the directory,
//! every endpoint's answers for unknown users and rooms) and a forge suite a correct provider
//! must refuse; with one it also runs the full flow in both directions (checks::flow), printing
//! `WAIT ...` lines for what the peer's operator must do.

pub mod checks;
pub mod config;
pub mod error;
pub mod listener;
pub mod mls;
pub mod report;
pub mod transport;

pub use config::KitConfig;
pub use error::KitError;
pub use report::{Line, Outcome, Summary, Verdict};

use report::Report;
use std::io::Write;

/// Runs every check against `config.peer`, writing the report to `out`; the summary's
/// `failed` count is non-zero when any check failed. An `Err` means the kit could not run at
/// all (unreadable TLS material, a port it cannot listen on, an unwritable `out`).
pub async fn run(config: KitConfig, out: &mut impl Write) -> Result<Summary, KitError> {
    let mut report = Report::new(out);
    let peer_user = config.peer_user.clone();
    let mut kit = checks::Kit::start(config).await?;
    report.say(
        "NOTE",
        &format!(
            "checking {} as {} (kit listener on {})",
            kit.config.peer, kit.config.as_domain, kit.listener.addr
        ),
    )?;
    checks::basic::run(&mut kit, &mut report).await?;
    checks::forge::run(&mut kit, &mut report).await?;
    match peer_user {
        Some(user) => checks::flow::run(&mut kit, &user, &mut report).await?,
        None => {
            for step in checks::flow::steps() {
                report.record(
                    step,
                    Outcome::skip(
                        "no --peer-user: the cooperative flow needs a test user at the peer",
                    ),
                )?;
            }
        }
    }
    kit.listener.stop().await;
    Ok(report.finish()?)
}
