//! The terminal of `parley chat`: lines typed, the moment a line starts (which sends a typing
//! indicator), and output that does not tear up the line being typed.
//!
//! A terminal in its usual line mode hands a program nothing before Enter, so nobody could be
//! told someone is typing. On a terminal the chat therefore reads key by key (no canonical mode,
//! no echo) and edits the line itself: printable text, Backspace, Ctrl-U (clear), Enter;
//! Ctrl-C, or Ctrl-D on an empty line, leaves. When input is not a terminal (a pipe, another
//! program), bytes are read as they come, and the first byte of a line is the start.

use std::collections::VecDeque;
use std::io::Write as _;
use tokio::io::AsyncReadExt as _;

/// What the person at the keyboard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The first character of a new line: they started typing.
    Started,
    /// A whole line, without its end.
    Line(String),
    /// They left (end of input, Ctrl-D on an empty line, Ctrl-C).
    Eof,
}

const CTRL_C: u8 = 0x03;
const CTRL_D: u8 = 0x04;
const BACKSPACE: u8 = 0x08;
const CTRL_U: u8 = 0x15;
const ESC: u8 = 0x1b;
const DELETE: u8 = 0x7f;
/// Longest line kept; more is dropped (a message is far smaller anyway).
const MAX_LINE: usize = 64 * 1024;

/// Where an escape sequence (arrow keys and the like, which the line editor ignores) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After ESC.
    Started,
    /// After `ESC [` or `ESC O`: parameters until a final byte.
    Sequence,
}

/// Turns the bytes typed into [`Input`]s; with `editing`, also handles Backspace, Ctrl-U,
/// Ctrl-C/Ctrl-D and escape sequences, and says what to echo.
#[derive(Debug)]
struct LineEditor {
    editing: bool,
    line: Vec<u8>,
    escape: Escape,
    out: VecDeque<Input>,
}

impl LineEditor {
    fn new(editing: bool) -> Self {
        Self {
            editing,
            line: Vec::new(),
            escape: Escape::None,
            out: VecDeque::new(),
        }
    }

    /// Feeds bytes; returns what to echo to the screen (editing mode only).
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut echo = Vec::new();
        for &b in bytes {
            if self.editing {
                self.edit(b, &mut echo);
            } else {
                self.plain(b);
            }
        }
        echo
    }

    /// Input that is not a terminal: lines end at `\n` (a `\r` before it is dropped).
    fn plain(&mut self, b: u8) {
        match b {
            b'\n' => self.finish(),
            b'\r' => {}
            _ => {
                self.push(b);
            }
        }
    }

    fn edit(&mut self, b: u8, echo: &mut Vec<u8>) {
        match self.escape {
            Escape::Started => {
                self.escape = if matches!(b, b'[' | b'O') {
                    Escape::Sequence
                } else {
                    Escape::None
                };
                return;
            }
            Escape::Sequence => {
                if (0x40..=0x7e).contains(&b) {
                    self.escape = Escape::None;
                }
                return;
            }
            Escape::None => {}
        }
        match b {
            // The console prints the finished line (see `Console::next`).
            b'\r' | b'\n' => self.finish(),
            CTRL_C => self.out.push_back(Input::Eof),
            CTRL_D if self.line.is_empty() => self.out.push_back(Input::Eof),
            BACKSPACE | DELETE => {
                if self.pop_char() {
                    echo.extend_from_slice(b"\x08 \x08");
                }
            }
            CTRL_U => {
                self.line.clear();
                echo.extend_from_slice(b"\r\x1b[2K");
            }
            ESC => self.escape = Escape::Started,
            b if b < 0x20 => {} // other control keys do nothing
            b => {
                if self.push(b) {
                    echo.push(b);
                }
            }
        }
    }

    /// Appends a byte of the line; the first one means the person started typing.
    fn push(&mut self, b: u8) -> bool {
        if self.line.len() >= MAX_LINE {
            return false;
        }
        if self.line.is_empty() {
            self.out.push_back(Input::Started);
        }
        self.line.push(b);
        true
    }

    /// Removes the last character (all bytes of a UTF-8 sequence); false if the line is empty.
    fn pop_char(&mut self) -> bool {
        while let Some(b) = self.line.pop() {
            if b & 0b1100_0000 != 0b1000_0000 {
                return true;
            }
        }
        false
    }

    fn finish(&mut self) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        self.out.push_back(Input::Line(line));
    }
}

/// The chat's console: keyboard in, lines out, and a notice (who is typing) kept just above
/// the line being typed.
pub struct Console {
    stdin: tokio::io::Stdin,
    editor: LineEditor,
    raw: Option<raw::RawMode>,
    notice: Option<String>,
    /// Whether the notice is on screen (terminals only; elsewhere it is printed once).
    notice_shown: bool,
}

impl Console {
    /// Switches a terminal to key-by-key input (restored on drop).
    pub fn new() -> Self {
        let raw = raw::RawMode::enable();
        Self {
            stdin: tokio::io::stdin(),
            editor: LineEditor::new(raw.is_some()),
            raw,
            notice: None,
            notice_shown: false,
        }
    }

    /// The next input. Cancellation-safe: bytes read are kept until handed out.
    pub async fn next(&mut self) -> std::io::Result<Input> {
        loop {
            if let Some(input) = self.editor.out.pop_front() {
                if let (Input::Line(line), Some(_)) = (&input, &self.raw) {
                    // Into the transcript, above the notice and the next line being typed.
                    self.print(std::slice::from_ref(line));
                }
                return Ok(input);
            }
            let mut buf = [0u8; 1024];
            let n = self.stdin.read(&mut buf).await?;
            if n == 0 {
                if !self.editor.line.is_empty() {
                    self.editor.finish();
                }
                self.editor.out.push_back(Input::Eof);
                continue;
            }
            let echo = self.editor.feed(&buf[..n]);
            if !echo.is_empty() {
                write_out(&echo);
            }
        }
    }

    /// Prints lines above the line being typed (and the notice), then puts those back.
    pub fn print(&mut self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        self.clear_bottom();
        let mut out = Vec::new();
        for line in lines {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        write_out(&out);
        self.draw_bottom();
    }

    /// Shows `text` above the line being typed; `None` removes the notice. Only a change of
    /// text redraws anything.
    pub fn set_notice(&mut self, notice: Option<String>) {
        if self.notice == notice {
            return;
        }
        self.clear_bottom();
        self.notice = notice;
        if self.raw.is_none() {
            // Not a terminal: nothing can be taken back, so a notice is one line, once.
            if let Some(text) = &self.notice {
                write_out(format!("{text}\n").as_bytes());
            }
            return;
        }
        self.draw_bottom();
    }

    /// Erases the line being typed and the notice above it (terminals only).
    fn clear_bottom(&mut self) {
        if self.raw.is_none() {
            return;
        }
        let mut out = b"\r\x1b[2K".to_vec();
        if self.notice_shown {
            out.extend_from_slice(b"\x1b[1A\x1b[2K");
            self.notice_shown = false;
        }
        write_out(&out);
    }

    /// Draws the notice and the line being typed (terminals only).
    fn draw_bottom(&mut self) {
        if self.raw.is_none() {
            return;
        }
        let mut out = Vec::new();
        if let Some(text) = &self.notice {
            out.extend_from_slice(format!("\x1b[2m{text}\x1b[0m\n").as_bytes());
            self.notice_shown = true;
        }
        out.extend_from_slice(&self.editor.line);
        write_out(&out);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.clear_bottom();
    }
}

/// Writes straight to the terminal: errors (a closed stdout) leave nothing to do.
fn write_out(bytes: &[u8]) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
}

#[cfg(unix)]
mod raw {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions, SpecialCodeIndex};
    use std::io::IsTerminal as _;

    /// A terminal switched to key-by-key input without echo; restored on drop (also when the
    /// chat ends by an error or a panic, since Ctrl-C arrives as a key, not as a signal).
    pub struct RawMode {
        saved: rustix::termios::Termios,
    }

    impl RawMode {
        pub fn enable() -> Option<Self> {
            let stdin = std::io::stdin();
            if !stdin.is_terminal() || !std::io::stdout().is_terminal() {
                return None;
            }
            let saved = tcgetattr(&stdin).ok()?;
            let mut raw = saved.clone();
            raw.local_modes
                .remove(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG);
            raw.special_codes[SpecialCodeIndex::VMIN] = 1;
            raw.special_codes[SpecialCodeIndex::VTIME] = 0;
            tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
            Some(Self { saved })
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
        }
    }
}

#[cfg(not(unix))]
mod raw {
    /// Elsewhere the terminal stays in line mode: a start is seen only at Enter.
    pub struct RawMode;

    impl RawMode {
        pub fn enable() -> Option<Self> {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(editor: &mut LineEditor) -> Vec<Input> {
        editor.out.drain(..).collect()
    }

    #[test]
    fn piped_input_starts_at_the_first_byte_of_a_line() {
        let mut e = LineEditor::new(false);
        assert!(e.feed(b"he").is_empty(), "no echo without a terminal");
        assert_eq!(inputs(&mut e), [Input::Started]);
        e.feed(b"llo\r\n\nsecond");
        assert_eq!(
            inputs(&mut e),
            [
                Input::Line("hello".into()),
                Input::Line(String::new()),
                Input::Started
            ]
        );
        e.feed(b" line\n");
        assert_eq!(inputs(&mut e), [Input::Line("second line".into())]);
    }

    #[test]
    fn terminals_get_a_small_line_editor() {
        let mut e = LineEditor::new(true);
        assert_eq!(e.feed(b"hi"), b"hi");
        assert_eq!(inputs(&mut e), [Input::Started]);
        // Backspace erases one character, also a multi-byte one.
        assert_eq!(e.feed(&[DELETE]), b"\x08 \x08");
        e.feed("é".as_bytes());
        e.feed(&[BACKSPACE]);
        assert_eq!(e.line, b"h");
        // Arrow keys are ignored, not typed.
        assert!(e.feed(b"\x1b[A\x1bOB").is_empty());
        assert_eq!(e.feed(b"ey\r"), b"ey");
        assert_eq!(inputs(&mut e), [Input::Line("hey".into())]);
        // Ctrl-U clears; clearing to empty and typing again is a new start.
        e.feed(b"oops");
        e.feed(&[CTRL_U]);
        e.feed(b"ok\n");
        assert_eq!(
            inputs(&mut e),
            [Input::Started, Input::Started, Input::Line("ok".into())]
        );
        // Ctrl-D leaves only on an empty line; Ctrl-C always.
        e.feed(b"x");
        e.feed(&[CTRL_D]);
        assert_eq!(inputs(&mut e), [Input::Started]);
        e.feed(&[CTRL_C]);
        assert_eq!(inputs(&mut e), [Input::Eof]);
        // Backspace on an empty line echoes nothing.
        let mut empty = LineEditor::new(true);
        assert!(empty.feed(&[DELETE]).is_empty());
    }
}
