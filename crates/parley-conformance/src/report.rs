//! The kit's output: one line per check (`PASS|FAIL|SKIP name: detail`), notes for the peer's
//! operator (`WAIT ...`, `NOTE ...`), and the closing summary (`N passed, M failed, K skipped`).

use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub detail: String,
}

impl Outcome {
    pub fn pass(detail: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Pass,
            detail: detail.into(),
        }
    }

    pub fn fail(detail: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Fail,
            detail: detail.into(),
        }
    }

    pub fn skip(detail: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Skip,
            detail: detail.into(),
        }
    }

    /// Pass when `ok`, else fail, with the same detail.
    pub fn check(ok: bool, detail: impl Into<String>) -> Self {
        if ok {
            Self::pass(detail)
        } else {
            Self::fail(detail)
        }
    }
}

/// One printed check line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub verdict: Verdict,
    pub name: String,
    pub detail: String,
}

/// The counts of a run, and every check line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub lines: Vec<Line>,
}

impl Summary {
    /// The check called `name`, if it ran.
    pub fn line(&self, name: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.name == name)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Line> {
        self.lines.iter().filter(|l| l.verdict == Verdict::Fail)
    }

    /// The closing line, `N passed, M failed, K skipped`.
    pub fn totals(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// Writes check lines as they are decided, and counts them.
pub struct Report<'w, W: Write> {
    out: &'w mut W,
    summary: Summary,
}

/// Keeps a detail on one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl<'w, W: Write> Report<'w, W> {
    pub fn new(out: &'w mut W) -> Self {
        Self {
            out,
            summary: Summary::default(),
        }
    }

    pub fn record(&mut self, name: &str, outcome: Outcome) -> std::io::Result<()> {
        let detail = one_line(&outcome.detail);
        writeln!(self.out, "{} {name}: {detail}", outcome.verdict.word())?;
        self.out.flush()?;
        match outcome.verdict {
            Verdict::Pass => self.summary.passed += 1,
            Verdict::Fail => self.summary.failed += 1,
            Verdict::Skip => self.summary.skipped += 1,
        }
        tracing::debug!(check = name, verdict = outcome.verdict.word(), %detail);
        self.summary.lines.push(Line {
            verdict: outcome.verdict,
            name: name.to_owned(),
            detail,
        });
        Ok(())
    }

    /// Whether the check called `name` was recorded.
    pub fn has(&self, name: &str) -> bool {
        self.summary.line(name).is_some()
    }

    /// A line for the peer's operator: `WAIT <what to do>` or `NOTE <text>`.
    pub fn say(&mut self, tag: &str, text: &str) -> std::io::Result<()> {
        writeln!(self.out, "{tag} {}", one_line(text))?;
        self.out.flush()
    }

    /// Prints the totals and hands back the summary.
    pub fn finish(self) -> std::io::Result<Summary> {
        writeln!(self.out, "{}", self.summary.totals())?;
        self.out.flush()?;
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_totals() {
        let mut out = Vec::new();
        let mut r = Report::new(&mut out);
        r.record("a", Outcome::pass("fine")).unwrap();
        r.record("b", Outcome::fail("bad\nthing")).unwrap();
        r.record("c", Outcome::skip("later")).unwrap();
        r.say("WAIT", "do it").unwrap();
        let s = r.finish().unwrap();
        assert_eq!((s.passed, s.failed, s.skipped), (1, 1, 1));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "PASS a: fine\nFAIL b: bad thing\nSKIP c: later\nWAIT do it\n1 passed, 1 failed, 1 skipped\n"
        );
        assert_eq!(s.failures().count(), 1);
    }
}
