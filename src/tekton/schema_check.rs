//! Test-only validation of generated objects against the Tekton v1 OpenAPI document a real API
//! server serves (`../shared/tekton/openapi-v3-tekton.dev-v1.json`), as strict as
//! `kubectl apply --validate=strict`: unknown fields, wrong types, enum values and missing required
//! fields are errors.
//!
//! The structural schema marks `pipelineSpec` and `taskSpec` as `x-kubernetes-preserve-unknown-fields`
//! with a description "See Pipeline.spec (API version: tekton.dev/v1)"; the checker follows those
//! cross-references into the Pipeline and Task schemas of the same document, so embedded specs are
//! checked too. References to core types ("See PersistentVolumeClaim (API version: v1)") have no
//! schema in the document and are accepted as the API server does.

use serde_json::Value;

/// The OpenAPI document.
pub fn document() -> Value {
    let path = format!("{}/../shared/tekton/openapi-v3-tekton.dev-v1.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("openapi json")
}

/// Every problem of `object` against `components.schemas[schema_name]`, as `path: message`.
pub fn validate(doc: &Value, schema_name: &str, object: &Value) -> Vec<String> {
    let schema = &doc["components"]["schemas"][schema_name];
    assert!(schema.is_object(), "no schema {schema_name}");
    let mut errors = Vec::new();
    Checker { doc }.check(object, schema, "$", &mut errors);
    errors
}

struct Checker<'a> {
    doc: &'a Value,
}

impl Checker<'_> {
    fn resolve<'s>(&'s self, schema: &'s Value) -> &'s Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name =
                    r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unsupported $ref {r}"));
                &self.doc["components"]["schemas"][name]
            }
            None => schema,
        }
    }

    /// The Tekton schema a preserve-unknown-fields node points at in its description.
    fn cross_reference(&self, schema: &Value) -> Option<&Value> {
        let description = schema.get("description")?.as_str()?;
        let kind = if description.contains("See Pipeline.spec (API version: tekton.dev/v1)") {
            "dev.tekton.v1.Pipeline"
        } else if description.contains("See Task.spec (API version: tekton.dev/v1)") {
            "dev.tekton.v1.Task"
        } else {
            return None;
        };
        Some(&self.doc["components"]["schemas"][kind]["properties"]["spec"])
    }

    fn check(&self, value: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.check(value, s, path, errors);
            }
        }
        if value.is_null() {
            if schema.get("nullable") != Some(&Value::Bool(true)) {
                errors.push(format!("{path}: null is not allowed"));
            }
            return;
        }
        let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if preserve && schema.get("properties").is_none() {
            if let Some(target) = self.cross_reference(schema) {
                self.check(value, target, path, errors);
            }
            return;
        }
        if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            if !(value.is_string() || value.is_i64() || value.is_u64()) {
                errors.push(format!("{path}: expected integer or string, got {value}"));
            }
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            errors.push(format!("{path}: {value} is not one of {allowed:?}"));
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("object") => self.check_object(value, schema, preserve, path, errors),
            Some("array") => match value.as_array() {
                Some(items) => {
                    if let Some(item_schema) = schema.get("items") {
                        for (i, item) in items.iter().enumerate() {
                            self.check(item, item_schema, &format!("{path}[{i}]"), errors);
                        }
                    }
                }
                None => errors.push(format!("{path}: expected array, got {value}")),
            },
            Some("string") => {
                if !value.is_string() {
                    errors.push(format!("{path}: expected string, got {value}"));
                }
            }
            Some("boolean") => {
                if !value.is_boolean() {
                    errors.push(format!("{path}: expected boolean, got {value}"));
                }
            }
            Some("integer") => match value.as_i64() {
                Some(n) => {
                    let fits = match schema.get("format").and_then(Value::as_str) {
                        Some("int32") => i32::try_from(n).is_ok(),
                        _ => true,
                    };
                    if !fits {
                        errors.push(format!("{path}: {n} does not fit int32"));
                    }
                }
                None => errors.push(format!("{path}: expected integer, got {value}")),
            },
            Some("number") => {
                if !value.is_number() {
                    errors.push(format!("{path}: expected number, got {value}"));
                }
            }
            Some(other) => errors.push(format!("{path}: schema type {other} unsupported by the checker")),
            None => {
                if schema.get("properties").is_some() {
                    self.check_object(value, schema, preserve, path, errors);
                }
            }
        }
    }

    fn check_object(
        &self,
        value: &Value,
        schema: &Value,
        preserve: bool,
        path: &str,
        errors: &mut Vec<String>,
    ) {
        let Some(map) = value.as_object() else {
            errors.push(format!("{path}: expected object, got {value}"));
            return;
        };
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for r in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) {
                    errors.push(format!("{path}: missing required field {r:?}"));
                }
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (key, v) in map {
            let child = format!("{path}.{key}");
            match (properties.and_then(|p| p.get(key)), additional) {
                (Some(s), _) => self.check(v, s, &child, errors),
                (None, Some(Value::Bool(true))) => {}
                (None, Some(s)) if s.is_object() => self.check(v, s, &child, errors),
                _ if preserve => {}
                _ => errors.push(format!("{child}: unknown field")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Value {
        let path = format!("{}/../shared/tekton/example-pipelinerun.yaml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("example");
        crate::yaml::from_str(&text).expect("yaml")
    }

    #[test]
    fn the_webhook_accepted_example_is_valid() {
        let doc = document();
        assert_eq!(validate(&doc, "dev.tekton.v1.PipelineRun", &example()), Vec::<String>::new());
    }

    #[test]
    fn recorded_pipelineruns_are_valid() {
        let doc = document();
        let dir = format!("{}/../shared/fixtures/tekton", env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.to_string_lossy().ends_with(".pipelinerun.yaml") {
                let v: Value =
                    crate::yaml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("yaml");
                assert_eq!(validate(&doc, "dev.tekton.v1.PipelineRun", &v), Vec::<String>::new(), "{path:?}");
                n += 1;
            }
        }
        assert!(n >= 6);
    }

    #[test]
    fn catches_unknown_fields_wrong_types_and_missing_required() {
        let doc = document();
        let mut bad = example();
        bad["spec"]["timeoutz"] = "5m".into();
        bad["spec"]["taskRunTemplate"]["podTemplate"]["automountServiceAccountToken"] = "false".into();
        let tasks = &mut bad["spec"]["pipelineSpec"]["tasks"];
        // Deep inside the embedded task: the cross-references are followed.
        tasks[2]["taskSpec"]["steps"][0]["imagee"] = "x".into();
        tasks[2]["taskSpec"]["steps"][0]["env"][0]["value"] = 3.into();
        tasks[1]["runAfter"] = "setup".into();
        tasks[0]["taskSpec"]["steps"][0].as_object_mut().expect("step").remove("name");
        let errors = validate(&doc, "dev.tekton.v1.PipelineRun", &bad);
        let want = [
            "$.spec.timeoutz: unknown field",
            "$.spec.taskRunTemplate.podTemplate.automountServiceAccountToken: expected boolean",
            "$.spec.pipelineSpec.tasks[2].taskSpec.steps[0].imagee: unknown field",
            "$.spec.pipelineSpec.tasks[2].taskSpec.steps[0].env[0].value: expected string",
            "$.spec.pipelineSpec.tasks[1].runAfter: expected array",
            "$.spec.pipelineSpec.tasks[0].taskSpec.steps[0]: missing required field \"name\"",
        ];
        for w in want {
            assert!(errors.iter().any(|e| e.starts_with(w)), "missing {w:?} in {errors:#?}");
        }
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
    }

    #[test]
    fn int32_and_int_or_string() {
        let doc = document();
        let mut v = example();
        v["spec"]["pipelineSpec"]["tasks"][0]["taskSpec"]["sidecars"] =
            serde_json::json!([{"name": "s", "image": "x", "ports": [{"containerPort": 5_000_000_000i64}]}]);
        let errors = validate(&doc, "dev.tekton.v1.PipelineRun", &v);
        assert!(
            errors.iter().any(|e| e.ends_with("containerPort: 5000000000 does not fit int32")),
            "{errors:?}"
        );
        v["spec"]["pipelineSpec"]["tasks"][0]["taskSpec"]["sidecars"][0]["ports"][0]["containerPort"] =
            8080.into();
        assert_eq!(validate(&doc, "dev.tekton.v1.PipelineRun", &v), Vec::<String>::new());
        let mut v = example();
        let quantity = serde_json::json!({"cpu": 2, "memory": "1Gi"});
        v["spec"]["pipelineSpec"]["tasks"][2]["taskSpec"]["steps"][0]["computeResources"]["limits"] =
            quantity;
        assert_eq!(validate(&doc, "dev.tekton.v1.PipelineRun", &v), Vec::<String>::new());
        v["spec"]["pipelineSpec"]["tasks"][2]["taskSpec"]["steps"][0]["computeResources"]["limits"]["cpu"] =
            serde_json::json!([1]);
        let errors = validate(&doc, "dev.tekton.v1.PipelineRun", &v);
        assert!(errors.iter().any(|e| e.contains("expected integer or string")), "{errors:?}");
    }
}
