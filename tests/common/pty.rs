//! The real binary in a pseudo-terminal, for the end-to-end TUI tests: spawned in a fresh home
//! folder, its output read into a vt100 screen and a raw byte log, keys typed, the window
//! resized, signals sent, the exit waited for. Included by the `tui_pty*` tests with
//! `#[path = "common/pty.rs"] mod pty;`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, Child, CommandBuilder, ExitStatus, MasterPty, PtySize};

fn nz(n: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(n).unwrap()
}

fn size(rows: u16, cols: u16) -> PtySize {
    PtySize {
        rows,
        cols,
        pixel_width: 0,
        pixel_height: 0,
    }
}

/// One run of the binary in a pseudo-terminal.
pub struct Tui {
    pub master: Box<dyn MasterPty + Send>,
    pub child: Box<dyn Child + Send + Sync>,
    /// The run's HOME, XDG_CONFIG_HOME and working folder.
    pub home: PathBuf,
    /// The home folder when this value made it (removed with the value).
    _owned: Option<tempfile::TempDir>,
    parser: Arc<Mutex<vt100::Parser>>,
    raw: Arc<Mutex<Vec<u8>>>,
    writer: Box<dyn Write + Send>,
}

impl Tui {
    /// Starts `blackmamba ARGS` on a `rows` x `cols` terminal (TERM=xterm-256color; NO_COLOR and
    /// the hub's variables unset unless `env` sets them, so the caller's settings do not leak in),
    /// after `prepare` has written what it needs into the home folder.
    pub fn spawn(args: &[&str], rows: u16, cols: u16, env: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Self {
        let home = tempfile::tempdir().unwrap();
        prepare(home.path());
        Self::spawn_in(home, args, rows, cols, env)
    }

    /// [`Tui::spawn`] in a home folder the caller made (for `env` values that name paths in it),
    /// removed with the value.
    pub fn spawn_in(home: tempfile::TempDir, args: &[&str], rows: u16, cols: u16, env: &[(&str, &str)]) -> Self {
        let mut t = Self::spawn_at(home.path(), args, rows, cols, env);
        t._owned = Some(home);
        t
    }

    /// [`Tui::spawn`] in a folder the caller keeps (e.g. a second run on the first one's files).
    pub fn spawn_at(home: &Path, args: &[&str], rows: u16, cols: u16, env: &[(&str, &str)]) -> Self {
        let pair = native_pty_system().openpty(size(rows, cols)).unwrap();
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_blackmamba"));
        cmd.args(args);
        cmd.env("TERM", "xterm-256color");
        cmd.env("HOME", home);
        cmd.env("XDG_CONFIG_HOME", home);
        for k in ["NO_COLOR", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.cwd(home);
        let child = pair.slave.spawn_command(cmd).unwrap();
        drop(pair.slave);
        let parser = Arc::new(Mutex::new(vt100::Parser::new(nz(rows), nz(cols), 0)));
        let raw = Arc::new(Mutex::new(Vec::<u8>::new()));
        let mut reader = pair.master.try_clone_reader().unwrap();
        {
            let (parser, raw) = (parser.clone(), raw.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    parser.lock().unwrap().process(&buf[..n]);
                    raw.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let writer = pair.master.take_writer().unwrap();
        Self {
            master: pair.master,
            child,
            home: home.to_path_buf(),
            _owned: None,
            parser,
            raw,
            writer,
        }
    }

    /// The screen's text now.
    pub fn text(&self) -> String {
        self.parser.lock().unwrap().screen().contents()
    }

    /// Everything the program wrote so far, escape sequences included.
    pub fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).to_string()
    }

    /// The last `n` bytes the program wrote (lossy text).
    pub fn raw_tail(&self, n: usize) -> String {
        let raw = self.raw.lock().unwrap();
        String::from_utf8_lossy(&raw[raw.len().saturating_sub(n)..]).to_string()
    }

    /// Whether the screen is the alternate one.
    pub fn alternate_screen(&self) -> bool {
        self.parser.lock().unwrap().screen().alternate_screen()
    }

    /// Waits until `pred` holds for the screen text and returns that text; fails the test after
    /// `secs` seconds, showing the screen.
    pub fn wait(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.text();
            if pred(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `bytes` once.
    pub fn send(&mut self, bytes: &[u8]) {
        self.send_n(bytes, 1);
    }

    /// Types `bytes` `times` times.
    pub fn send_n(&mut self, bytes: &[u8], times: usize) {
        for _ in 0..times {
            self.writer.write_all(bytes).unwrap();
            self.writer.flush().unwrap();
        }
    }

    /// Resizes the terminal (and the screen model with it).
    pub fn resize(&self, rows: u16, cols: u16) {
        self.master.resize(size(rows, cols)).unwrap();
        self.parser.lock().unwrap().set_size(nz(rows), nz(cols));
    }

    /// Sends `kill -SIG` to the program (`sig` as `kill` names it: TERM, HUP, INT).
    pub fn kill(&self, sig: &str) {
        let pid = self.child.process_id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{sig} {pid}");
    }

    /// Ctrl-Q, and the exit status is success.
    pub fn quit(mut self) {
        self.send(b"\x11");
        let status = self.wait_exit("the app did not quit", 20);
        assert!(status.success(), "exit status {status:?}");
    }

    /// Waits for the program to end; fails the test with `what` after `secs` seconds.
    pub fn wait_exit(&mut self, what: &str, secs: u64) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pty's line discipline flags (Debug of termios' local flags, e.g. "ICANON | ECHO").
    pub fn local_flags(&self) -> String {
        format!("{:?}", self.master.get_termios().unwrap().local_flags)
    }
}
