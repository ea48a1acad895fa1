//! The reference's flags, as Go's `flag` package reads them: one dash or
//! two, `-flag=value` and `-flag value` for values, `-flag` or
//! `-flag=false` for booleans (a boolean never takes the next argument).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, Parser};

/// What `docker-checkpoint` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "docker-checkpoint",
    about = "Checkpoint a running Docker container with its processes (CRIU), or restore one under a new name",
    disable_version_flag = true
)]
pub struct Args {
    /// Container name or id (required).
    #[arg(long, value_parser = component("container"))]
    pub container: Option<String>,
    /// Checkpoint name.
    #[arg(long, default_value = "checkpoint1", value_parser = component("name"))]
    pub name: String,
    /// Where checkpoints are kept: <dir>/<container>/<name>/.
    #[arg(long, default_value = "/tmp/docker-checkpoints")]
    pub dir: PathBuf,
    /// Keep the container running after the checkpoint.
    #[arg(long = "leave-running", default_value = "true", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub leave_running: bool,
    /// Checkpoint established TCP connections.
    #[arg(long, default_value = "true", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub tcp: bool,
    /// Checkpoint file locks.
    #[arg(long = "file-locks", default_value = "true", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub file_locks: bool,
    /// Pre-dump memory first (needs the kernel's soft-dirty tracking).
    #[arg(long = "pre-dump", default_value = "false", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub pre_dump: bool,
    /// Restore instead of checkpoint.
    #[arg(long, default_value = "false", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub restore: bool,
    /// Name of the restored container (default <container>-restored).
    #[arg(long = "new-name", value_parser = component("new-name"))]
    pub new_name: Option<String>,
}

/// The flags this program knows, by the name Go's flag package gives them.
const FLAGS: [&str; 11] = [
    "container",
    "name",
    "dir",
    "leave-running",
    "tcp",
    "file-locks",
    "pre-dump",
    "restore",
    "new-name",
    "help",
    "h",
];

/// Flags that take a value (the rest are booleans).
const VALUE_FLAGS: [&str; 4] = ["container", "name", "dir", "new-name"];

/// `argv` rewritten for clap as Go's flag package reads it: `-flag` and
/// `--flag` alike, a value flag's value (`-flag value` or `-flag=value`)
/// joined to it as `--flag=value` (so a value starting with `-` stays a
/// value), booleans as given. Flags end at `--`, `-` or the first argument
/// that is not one.
pub fn go_style(argv: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args = argv.into_iter();
    let mut out: Vec<OsString> = args.next().into_iter().collect();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        if text == "--" || text == "-" || !text.starts_with('-') {
            out.push(arg);
            out.extend(args);
            break;
        }
        let bare = text.strip_prefix("--").unwrap_or(&text[1..]);
        let (name, inline) = match bare.split_once('=') {
            Some((name, _)) => (name, true),
            None => (bare, false),
        };
        if !FLAGS.contains(&name) {
            // Unknown: clap reports it.
            out.push(arg);
            continue;
        }
        if name == "h" {
            out.push("-h".into());
        } else if VALUE_FLAGS.contains(&name) && !inline {
            let mut joined = OsString::from(format!("--{name}="));
            if let Some(value) = args.next() {
                joined.push(value);
            }
            out.push(joined);
        } else {
            out.push(format!("--{bare}").into());
        }
    }
    out
}

/// Parses `argv` as Go's flag package would read the reference's flags.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Args, clap::Error> {
    Args::try_parse_from(go_style(argv))
}

/// A boolean as Go's `strconv.ParseBool` reads one.
fn go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true, false, 1, 0, t, f)")),
    }
}

/// A value that becomes one directory name: a Docker name's characters
/// (`[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 128), never `.` or `..` or a
/// path.
fn component(flag: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |text: &str| {
        let first_ok = text.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if first_ok && rest_ok && text.len() <= 128 {
            Ok(text.to_string())
        } else {
            Err(format!(
                "-{flag} {text:?} must be 1 to 128 of A-Z a-z 0-9 _ . - starting with a letter or digit"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &[&str]) -> Result<Args, clap::Error> {
        parse(
            std::iter::once("docker-checkpoint")
                .chain(line.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn the_references_flags_and_defaults() {
        let a = args(&["-container", "testapp", "-name", "checkpoint1"]).unwrap();
        assert_eq!(a.container.as_deref(), Some("testapp"));
        assert_eq!(a.name, "checkpoint1");
        assert_eq!(a.dir, PathBuf::from("/tmp/docker-checkpoints"));
        assert!(a.leave_running && a.tcp && a.file_locks);
        assert!(!a.pre_dump && !a.restore);
        assert_eq!(a.new_name, None);

        let r = args(&[
            "-restore",
            "-container=testapp",
            "-name",
            "checkpoint1",
            "-new-name",
            "testapp-restored",
        ])
        .unwrap();
        assert!(r.restore);
        assert_eq!(r.new_name.as_deref(), Some("testapp-restored"));

        let b = args(&[
            "--container",
            "c",
            "-leave-running=false",
            "-tcp=0",
            "-file-locks=F",
            "-pre-dump",
        ])
        .unwrap();
        assert!(!b.leave_running && !b.tcp && !b.file_locks && b.pre_dump);
        assert_eq!(
            args(&["-container", "c", "-dir=/srv/cp"]).unwrap().dir,
            PathBuf::from("/srv/cp")
        );
    }

    #[test]
    fn a_boolean_never_takes_the_next_argument_and_bad_values_are_refused() {
        // As in Go, `-restore false` is `-restore` and a stray argument.
        assert!(args(&["-container", "c", "-restore", "false"]).is_err());
        assert!(args(&["-container", "c", "-tcp=maybe"]).is_err());
        for bad in ["../etc", "a/b", ".", "..", "", "-x", "x\ny", &"n".repeat(129)] {
            assert!(args(&["-container", "c", "-name", bad]).is_err(), "{bad:?}");
            assert!(args(&["-container", bad]).is_err(), "{bad:?}");
        }
        assert!(args(&["-container", "c", "-unknown"]).is_err());
        assert!(args(&["-container", "c", "stray"]).is_err());
        assert!(args(&["-h"]).is_err_and(|e| e.kind() == clap::error::ErrorKind::DisplayHelp));
    }

    #[test]
    fn go_style_joins_values_and_stops_at_the_first_non_flag() {
        let line = |l: &[&str]| {
            go_style(l.iter().map(OsString::from))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line(&[
                "p",
                "-container",
                "-odd",
                "-restore",
                "--name=x",
                "-tcp=false",
                "rest",
                "-dir",
                "d"
            ]),
            [
                "p",
                "--container=-odd",
                "--restore",
                "--name=x",
                "--tcp=false",
                "rest",
                "-dir",
                "d"
            ]
        );
        assert_eq!(line(&["p", "--", "-container"]), ["p", "--", "-container"]);
    }
}
