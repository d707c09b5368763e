//! The `bobbin` binary end to end: `bobbin render` on good and bad input, with no SPINDLE_*
//! variables set.

use std::path::{Path, PathBuf};
use std::process::Command;

fn shared(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(path)
}

/// Run bobbin with an empty environment (plus `BOBBIN_CONFIG=""` so no config file is read).
fn bobbin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bobbin"))
        .args(args)
        .env_clear()
        .env("BOBBIN_CONFIG", "")
        .output()
        .expect("run bobbin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn docs(stdout: &str) -> Vec<serde_json::Value> {
    assert!(stdout.starts_with("---\n"), "{stdout}");
    stdout
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| bobbin::yaml::from_str(d).expect("each document is YAML"))
        .collect()
}

const FILE_ARGS: [&str; 6] = [
    "--repo",
    "did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle",
    "--knot",
    "knot1.tangled.sh",
    "--sha",
    "356a192b7913b04c54574d18c28d46e6395428ab",
];

fn render_file(path: &Path, extra: &[&str]) -> (i32, String, String) {
    let path = path.to_str().expect("utf-8 path");
    let mut args = vec!["render", "--workflow-file", path];
    args.extend(FILE_ARGS);
    args.extend(extra);
    bobbin(&args)
}

#[test]
fn renders_a_workflow_file() {
    let (code, out, err) =
        render_file(&shared("spec/fixtures/workflows/simple-image.yml"), &["--namespace", "ci"]);
    assert_eq!(code, 0, "{err}");
    let rendered = docs(&out);
    assert_eq!(rendered.len(), 1);
    let pr = &rendered[0];
    assert_eq!(pr["apiVersion"], "tekton.dev/v1");
    assert_eq!(pr["kind"], "PipelineRun");
    assert_eq!(pr["metadata"]["namespace"], "ci");
    assert_eq!(pr["metadata"]["labels"]["bobbin.dev/workflow"], "simple-image.yml");
    let tasks: Vec<&str> = pr["spec"]["pipelineSpec"]["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert_eq!(tasks, ["setup", "clone", "step-1-build", "step-2-test"]);

    let (code, out, err) =
        render_file(&shared("spec/fixtures/workflows/simple-image.yml"), &["--layout", "packed"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(docs(&out)[0]["spec"]["pipelineSpec"]["tasks"][0]["name"], "workflow");
}

#[test]
fn renders_every_workflow_of_an_event_or_the_named_one() {
    let event = shared("spec/fixtures/knot-events/pipeline-push.json");
    let event = event.to_str().expect("utf-8");
    let (code, out, err) = bobbin(&["render", "--event", event]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<String> = docs(&out)
        .iter()
        .map(|d| d["metadata"]["annotations"]["bobbin.dev/workflow"].as_str().expect("w").to_owned())
        .collect();
    assert_eq!(names, ["build.yml", "test.yml"]);

    let (code, out, err) = bobbin(&["render", "--event", event, "--workflow", "test.yml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(docs(&out).len(), 1);

    let (code, out, err) = bobbin(&["render", "--event", event, "--workflow", "nope.yml"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("no workflow named \"nope.yml\"") && err.contains("build.yml, test.yml"), "{err}");
}

#[test]
fn bad_workflow_files_exit_2_with_a_clear_message_and_no_output() {
    let dir = tempfile::tempdir().expect("tmp");
    let big = format!("engine: nixery\n# {}\nsteps: [{{name: s, command: c}}]\n", "x".repeat(1024 * 1024));
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed YAML", "engine: nixery\nsteps: [\n".into(), "line"),
        (
            "number for a list",
            "engine: nixery\nsteps: 3\n".into(),
            "invalid type: integer `3`, expected a sequence",
        ),
        (
            "missing image",
            "engine: kubernetes\nsteps: [{name: s, command: c}]\n".into(),
            "engine \"kubernetes\" needs an image",
        ),
        (
            "unknown engine",
            "engine: podman\nsteps: [{name: s, command: c}]\n".into(),
            "unknown engine \"podman\"",
        ),
        ("empty steps", "engine: nixery\nsteps: []\n".into(), "workflow has no steps"),
        (
            "duplicate step names",
            "engine: nixery\nsteps: [{name: s, command: a}, {name: s, command: b}]\n".into(),
            "duplicate step name \"s\"",
        ),
        (
            "list as env value",
            "engine: nixery\nenvironment:\n  A: [1, 2]\nsteps: [{name: s, command: c}]\n".into(),
            "(line 3, column",
        ),
        ("raw over 1 MiB", big, "the limit is 1048576 bytes (1 MiB)"),
        ("no engine", "steps: [{name: s, command: c}]\n".into(), "has no `engine`"),
    ];
    for (what, text, want) in cases {
        let path = dir.path().join("ci.yml");
        std::fs::write(&path, text).expect("write");
        let (code, out, err) = render_file(&path, &[]);
        assert_eq!(code, 2, "{what}: {err}");
        assert_eq!(out, "", "{what}: stdout must be empty");
        assert!(err.starts_with("error: workflow \"ci.yml\": "), "{what}: {err}");
        assert!(err.contains(want), "{what}: {err:?} should contain {want:?}");
    }
}

#[test]
fn bad_files_and_flags_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("missing.json");
    let bad_json = dir.path().join("bad.json");
    std::fs::write(&bad_json, "{\"rkey\": ").expect("write");
    let good = shared("spec/fixtures/workflows/simple-image.yml");
    let good = good.to_str().expect("utf-8");
    // A complete `--workflow-file` invocation but for the sha, then `extra`.
    let file_args = ["render", "--workflow-file", good, "--repo", "did:plc:a/r", "--knot", "k"];
    let with = |extra: &[&'static str]| -> Vec<&str> { file_args.iter().chain(extra).copied().collect() };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["render", "--event", missing.to_str().expect("utf-8")], "cannot read"),
        (vec!["render", "--event", bad_json.to_str().expect("utf-8")], "malformed knot event"),
        (vec!["render", "--workflow-file", good, "--knot", "k", "--sha", "abc"], "needs --repo"),
        (
            vec!["render", "--workflow-file", good, "--repo", "hello", "--knot", "k", "--sha", "abc"],
            "use DID/NAME",
        ),
        (with(&[]), "--sha is required"),
        (with(&["--sha", "a", "--layout", "stacked"]), "per-step or packed"),
        (with(&["--sha", "a", "--trigger", "merge"]), "push, pull_request or manual"),
        (with(&["--sha", "a", "--namespace", "Bad_NS"]), "not a valid namespace"),
        (vec!["render"], "required"),
    ];
    for (args, want) in cases {
        let (code, out, err) = bobbin(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
        assert!(err.contains(want), "{args:?}: {err:?} should contain {want:?}");
    }
    // A manual trigger needs no sha.
    let (code, _, err) = bobbin(&with(&["--trigger", "manual"]));
    assert_eq!(code, 0, "{err}");
}

/// What the README promises: the output goes straight into `kubectl apply`. Run with
/// `cargo test --test cli -- --ignored` against a cluster with Tekton (`KUBECONFIG`).
#[test]
#[ignore = "needs a cluster with Tekton"]
fn kubectl_accepts_the_rendered_pipelineruns() {
    use std::io::Write;
    for layout in ["per-step", "packed"] {
        let event = shared("spec/fixtures/knot-events/pipeline-pull-request.json");
        let (code, out, err) =
            bobbin(&["render", "--event", event.to_str().expect("utf-8"), "--layout", layout]);
        assert_eq!(code, 0, "{err}");
        let mut kubectl = Command::new("kubectl")
            .args(["apply", "--dry-run=server", "--validate=strict", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl");
        kubectl.stdin.take().expect("stdin").write_all(out.as_bytes()).expect("write");
        let result = kubectl.wait_with_output().expect("kubectl output");
        assert!(result.status.success(), "{layout}: {}", String::from_utf8_lossy(&result.stderr));
    }
}
