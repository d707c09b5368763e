//! How a step's command reaches the shell: exactly `bash -c <command>` as the Go spindle runs it
//! (spec §5.5), falling back to `sh -c` when the image has no bash, with nothing injected.
//!
//! The command is passed as an argument, never as a Tekton `script` (Tekton would prepend
//! `#!/bin/sh` and `set -e`, and a command starting with `#!` would become a shebang). Container
//! `command`, `args` and `env[].value` go through the kubelet's `$(VAR)` expansion, which also
//! turns `$$` into `$`, so every `$` is doubled: the shell then sees the text byte for byte
//! (`echo $$`, `$(date)` and `$(HOME)` keep their shell meaning).
//!
//! One thing cannot be escaped: Tekton's own variables. A command containing `$(params.…)`,
//! `$(context.…)` or `$(workspaces.…)` is substituted (or, for unknown params, rejected) by
//! Tekton before the pod exists. In a shell those would run commands named `params.…`, so real
//! workflows do not contain them.

/// The wrapper as the shell sees it: `$1` is the user's command (`$0` is `bobbin-step`).
pub const WRAPPER: &str =
    r#"if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; fi; exec sh -c "$1""#;

/// `$0` of the wrapper, visible in `ps` output.
pub const WRAPPER_NAME: &str = "bobbin-step";

/// The interpreter of the wrapper; every image that can run a shell step has it.
pub const SH: &str = "/bin/sh";

/// Escape `s` for a field the kubelet expands (`command`, `args`, `env[].value`).
pub fn escape_kubelet(s: &str) -> String {
    s.replace('$', "$$")
}

/// The container `command` of a shell step (kubelet-escaped).
pub fn step_command() -> Vec<String> {
    vec![SH.to_owned(), "-c".to_owned(), escape_kubelet(WRAPPER), WRAPPER_NAME.to_owned()]
}

/// The container `args` of a shell step running `command` (kubelet-escaped).
pub fn step_args(command: &str) -> Vec<String> {
    vec![escape_kubelet(command)]
}

/// The kubelet's expansion of `$(VAR)` references and `$$` escapes (Kubernetes'
/// `third_party/forked/golang/expansion`), so tests can check what a container really receives.
#[cfg(test)]
pub fn kubelet_expand(input: &str, env: &std::collections::BTreeMap<String, String>) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push(b'$');
                    i += 2;
                }
                b'(' => match input[i + 2..].find(')') {
                    Some(end) => {
                        let name = &input[i + 2..i + 2 + end];
                        match env.get(name) {
                            Some(v) => out.extend_from_slice(v.as_bytes()),
                            None => out.extend_from_slice(&bytes[i..i + 3 + end]),
                        }
                        i += 3 + end;
                    }
                    None => {
                        out.extend_from_slice(&bytes[i..]);
                        i = bytes.len();
                    }
                },
                _ => {
                    out.push(b'$');
                    i += 1;
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::process::Command;

    /// Run a shell step as the container would: kubelet expansion, then exec of command + args,
    /// with `PATH` set to `path`.
    fn run(user_command: &str, path: &str) -> (i32, String, String) {
        let env: BTreeMap<String, String> = [("HOME".to_owned(), "/tangled/home".to_owned())].into();
        let argv: Vec<String> = step_command()
            .into_iter()
            .chain(step_args(user_command))
            .map(|a| kubelet_expand(&a, &env))
            .collect();
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", path)
            .env("HOME", "/tangled/home")
            .output()
            .expect("run /bin/sh");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A PATH holding `sh` (dash here) and a few tools, but no bash.
    fn path_without_bash() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for tool in ["sh", "echo", "cat", "false", "true"] {
            let target = ["/bin", "/usr/bin"]
                .iter()
                .map(|d| std::path::Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{tool} not on this machine"));
            std::os::unix::fs::symlink(target, dir.path().join(tool)).expect("symlink");
        }
        dir
    }

    const TRICKY: &str = "#!/bin/false\n# not a shebang: a comment\necho \"pid-like: $$x\" 'single $HOME' \"$HOME\"\necho \"sub: $(echo inner)\" '$(HOME)' \"$0\"\nfalse\necho after-false\nexit 3";

    #[test]
    fn bash_runs_the_command_like_bash_c() {
        let (code, out, err) = run(&format!("{TRICKY}\n"), "/usr/bin:/bin");
        assert_eq!(code, 3, "{err}");
        // $$ is the shell's PID, so the first line only has a fixed prefix.
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("pid-like: ") && lines[0].ends_with(" single $HOME /tangled/home"),
            "{out}"
        );
        assert!(!lines[0].contains("$$"), "the shell must see $$, not the kubelet: {out}");
        // No `set -e`: `false` does not stop the script; `$0` is bash as with `bash -c`.
        assert_eq!(lines[1..], ["sub: inner $(HOME) bash", "after-false"], "{out}");
        let (_, out, _) = run("echo ${BASH_VERSION:+bash}", "/usr/bin:/bin");
        assert_eq!(out, "bash\n");
    }

    #[test]
    fn falls_back_to_sh_without_bash() {
        let dir = path_without_bash();
        let path = dir.path().to_str().expect("utf-8 path");
        let (code, out, err) = run(TRICKY, path);
        assert_eq!(code, 3, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1..], ["sub: inner $(HOME) sh", "after-false"], "{out}");
        let (code, out, _) = run("echo ${BASH_VERSION:-no-bash}", path);
        assert_eq!((code, out.as_str()), (0, "no-bash\n"));
    }

    #[test]
    fn multi_line_status_is_the_last_command() {
        assert_eq!(run("false\ntrue", "/usr/bin:/bin").0, 0);
        assert_eq!(run("true\nfalse", "/usr/bin:/bin").0, 1);
        assert_eq!(run("", "/usr/bin:/bin").0, 0);
    }

    #[test]
    fn escape_round_trips_through_kubelet_expansion() {
        let env: BTreeMap<String, String> = [("A".to_owned(), "x".to_owned())].into();
        for s in ["plain", "$", "$$", "$(A)", "$$(A)", "a$b$(c", "${A}", "$(A"] {
            assert_eq!(kubelet_expand(&escape_kubelet(s), &env), s, "{s:?}");
        }
        assert_eq!(kubelet_expand("$(A)-$$(A)-$(B)", &env), "x-$(A)-$(B)");
    }
}
