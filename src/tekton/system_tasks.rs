//! The canonical `setup` and `clone` Tasks (`tekton/*.yaml` at the repository root), embedded at
//! build time so every PipelineRun is self-contained. The YAML files stay installable on their own
//! (`kubectl apply -f tekton/`), so they are the one place the system steps' scripts live.

use std::sync::OnceLock;

use serde::Deserialize;

use super::types::EmbeddedTask;

const SETUP_YAML: &str = include_str!("../../tekton/setup-task.yaml");
const CLONE_YAML: &str = include_str!("../../tekton/clone-task.yaml");

/// Param names the translation passes (they must match the YAML).
pub mod params {
    pub const SETUP_IMAGE: &str = "setup-image";
    pub const SHARED_NIX_STORE: &str = "shared-nix-store";
    pub const GIT_IMAGE: &str = "git-image";
    pub const URL: &str = "url";
    pub const REVISION: &str = "revision";
    pub const DEPTH: &str = "depth";
    pub const SUBMODULES: &str = "submodules";
}

/// An embedded Task YAML that does not parse: a build defect, reported instead of panicking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("embedded Task {file}: {message}")]
pub struct SystemTaskError {
    pub file: &'static str,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskManifest {
    api_version: String,
    kind: String,
    spec: EmbeddedTask,
}

fn load(file: &'static str, text: &str) -> Result<EmbeddedTask, SystemTaskError> {
    let manifest: TaskManifest =
        crate::yaml::from_str(text).map_err(|e| SystemTaskError { file, message: e.to_string() })?;
    if manifest.api_version != "tekton.dev/v1" || manifest.kind != "Task" {
        return Err(SystemTaskError { file, message: "not a tekton.dev/v1 Task".into() });
    }
    if manifest.spec.steps.len() != 1 {
        return Err(SystemTaskError { file, message: "must have exactly one step".into() });
    }
    Ok(manifest.spec)
}

type Loaded = OnceLock<Result<EmbeddedTask, SystemTaskError>>;

/// The `setup` Task's spec (one step named `setup`), parsed once.
pub fn setup() -> Result<EmbeddedTask, SystemTaskError> {
    static SETUP: Loaded = OnceLock::new();
    SETUP.get_or_init(|| load("tekton/setup-task.yaml", SETUP_YAML)).clone()
}

/// The `clone` Task's spec (one step named `clone`), parsed once.
pub fn clone() -> Result<EmbeddedTask, SystemTaskError> {
    static CLONE: Loaded = OnceLock::new();
    CLONE.get_or_init(|| load("tekton/clone-task.yaml", CLONE_YAML)).clone()
}

/// The raw YAML documents, for tests that validate them as standalone Tasks.
#[cfg(test)]
pub const MANIFESTS: [(&str, &str); 2] =
    [("tekton/setup-task.yaml", SETUP_YAML), ("tekton/clone-task.yaml", CLONE_YAML)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tasks_load_and_declare_the_params_translation_passes() {
        let setup = setup().expect("setup");
        let clone = clone().expect("clone");
        assert_eq!(setup.steps[0].name, crate::plan::SETUP_TASK);
        assert_eq!(clone.steps[0].name, crate::plan::CLONE_TASK);
        let names = |t: &EmbeddedTask| t.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&setup), [params::SETUP_IMAGE, params::SHARED_NIX_STORE]);
        assert_eq!(
            names(&clone),
            [params::GIT_IMAGE, params::URL, params::REVISION, params::DEPTH, params::SUBMODULES]
        );
        for t in [&setup, &clone] {
            let script = t.steps[0].script.as_deref().unwrap_or_default();
            // An explicit shebang, so Tekton injects nothing.
            assert!(script.starts_with("#!/bin/sh\n"), "{script}");
            assert!(t.steps[0].command.is_empty());
        }
        let bad = load("x", "apiVersion: v1\nkind: Pod\nspec: {steps: []}\n").expect_err("not a Task");
        assert!(bad.to_string().contains("not a tekton.dev/v1 Task"), "{bad}");
    }

    /// Run the setup script with its absolute paths moved into a temp dir: it creates the
    /// directories and copies a root-owned, read-only nix store into a writable one. When the test
    /// runs as root (CI containers), the script runs as UID 1000 through `setpriv`, as in the pod.
    #[test]
    fn setup_script_prepares_the_volume_and_copies_the_nix_store() {
        use std::os::unix::fs::PermissionsExt;
        let chmod = |p: &std::path::Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let setpriv = is_root && std::path::Path::new("/usr/bin/setpriv").exists();
        let script = setup().expect("setup").steps[0].script.clone().expect("script");

        // per-step: the volume root belongs to the build user; packed: /tangled/.nix is an
        // emptyDir mount root (root-owned, 0777) the script must not try to chmod or touch.
        for packed in [false, true] {
            let tmp = tempfile::tempdir().expect("tmp");
            chmod(tmp.path(), 0o755);
            let root = tmp.path().join("tangled");
            let nix = tmp.path().join("nix");
            let bin = nix.join("store/abc-hello/bin");
            std::fs::create_dir_all(&bin).expect("mkdir");
            std::fs::create_dir_all(nix.join("var/nix/db")).expect("mkdir");
            std::fs::write(bin.join("hello"), "#!/bin/sh\necho hi\n").expect("write");
            for dir in [bin.clone(), nix.join("store/abc-hello"), nix.join("store")] {
                chmod(&dir, 0o555);
            }
            std::fs::create_dir_all(&root).expect("mkdir");
            if setpriv {
                std::os::unix::fs::chown(&root, Some(1000), Some(1000)).expect("chown");
            }
            if packed {
                std::fs::create_dir(root.join(".nix")).expect("mkdir");
                chmod(&root.join(".nix"), 0o777);
            }
            let script = script
                .replace("/nix/*", &format!("{}/*", nix.display()))
                .replace("/tangled", &root.display().to_string());
            let run = |arg: &str| {
                let mut cmd = if setpriv {
                    let mut c = std::process::Command::new("/usr/bin/setpriv");
                    c.args(["--reuid=1000", "--regid=1000", "--clear-groups", "/bin/sh"]);
                    c
                } else {
                    std::process::Command::new("/bin/sh")
                };
                cmd.args(["-c", &script, "setup", arg]).output().expect("sh")
            };
            let out = run("false");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(root.join("workspace").is_dir() && root.join("home").is_dir());
            assert_eq!(root.join(".nix").exists(), packed);
            let out = run("true");
            assert!(out.status.success(), "packed={packed}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(root.join(".nix/store/abc-hello/bin/hello").is_file());
            assert!(root.join(".nix/var/nix/db").is_dir());
            let mode = std::fs::metadata(root.join(".nix/store")).expect("store").permissions().mode();
            assert_eq!(mode & 0o200, 0o200, "the copied store is writable by its owner");
            // Leave the temp dir removable.
            for dir in [
                bin,
                nix.join("store/abc-hello"),
                root.join(".nix/store/abc-hello/bin"),
                root.join(".nix/store/abc-hello"),
            ] {
                chmod(&dir, 0o755);
            }
        }
    }

    /// Run the clone script with a real git against a local repository, as the Task would.
    #[test]
    fn clone_script_checks_out_the_commit_with_real_git() {
        if std::process::Command::new("git").arg("--version").output().is_err() {
            eprintln!("git not installed; skipping");
            return;
        }
        let clone = clone().expect("clone");
        let script = clone.steps[0].script.clone().expect("script");
        let tmp = tempfile::tempdir().expect("tmp");
        let git = |dir: &std::path::Path, args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(args)
                .current_dir(dir)
                .env("HOME", tmp.path())
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .expect("git");
            assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let origin = tmp.path().join("origin");
        std::fs::create_dir(&origin).expect("mkdir");
        git(&origin, &["init", "-q", "-b", "main"]);
        std::fs::write(origin.join("README"), "one\n").expect("write");
        git(&origin, &["add", "README"]);
        git(&origin, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one"]);
        let first = git(&origin, &["rev-parse", "HEAD"]);
        std::fs::write(origin.join("README"), "two\n").expect("write");
        git(&origin, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two"]);
        // Shallow fetches of a bare sha need this on the serving side (knots allow it).
        git(&origin, &["config", "uploadpack.allowAnySHA1InWant", "true"]);

        let run = |revision: &str, into: &str| {
            let work = tmp.path().join(into);
            let home = tmp.path().join(format!("{into}-home"));
            std::fs::create_dir_all(&work).expect("mkdir");
            std::fs::create_dir_all(&home).expect("mkdir");
            let url = format!("file://{}", origin.display());
            let out = std::process::Command::new("/bin/sh")
                .args(["-c", &script, "clone", &url, revision, "1", "false"])
                .current_dir(&work)
                .env("HOME", &home)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .expect("sh");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::fs::read_to_string(work.join("README")).expect("checked out")
        };
        assert_eq!(run(&first, "pinned"), "one\n");
        assert_eq!(run("", "default-branch"), "two\n");
    }
}
