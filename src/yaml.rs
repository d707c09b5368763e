//! The one place bobbin touches a YAML library.
//!
//! We use `serde_yaml` 0.9 (archived upstream, but stable and exactly what the design card names): it
//! reports line and column for every syntax and type error, which users need to fix a workflow, and it
//! is a drop-in serde format. Keeping it behind this module means a move to a maintained fork
//! (`serde_yaml_ng`, `serde_norway`) is a one-file change.

use std::fmt;

use serde::{Serialize, de::DeserializeOwned};

/// A YAML document that did not parse or did not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// What went wrong, without the location suffix.
    pub message: String,
    /// 1-based line and column, when the parser knows them.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) => write!(f, "{} (line {line}, column {column})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for YamlError {}

impl From<serde_yaml::Error> for YamlError {
    fn from(err: serde_yaml::Error) -> Self {
        let location = err.location().map(|l| (l.line(), l.column()));
        // serde_yaml appends " at line L column C" itself; keep the message clean and structured.
        let mut message = err.to_string();
        if let Some(idx) = message.find(" at line ") {
            message.truncate(idx);
        }
        YamlError { message, location }
    }
}

/// A generic YAML value, for callers that need to look at a document before typing it.
pub type Value = serde_yaml::Value;

/// Parse one YAML document into `T`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_yaml::from_str(text).map_err(YamlError::from)
}

/// Turn an already-parsed YAML value into `T`.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, YamlError> {
    serde_yaml::from_value(value).map_err(YamlError::from)
}

/// Serialize `value` as one YAML document (no leading `---`).
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> Result<String, YamlError> {
    serde_yaml::to_string(value).map_err(YamlError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_carry_line_and_column() {
        let err = from_str::<std::collections::BTreeMap<String, Vec<String>>>("a: [x]\nb: 3\n")
            .expect_err("a number is not a list");
        assert_eq!(err.location, Some((2, 4)));
        assert!(err.message.contains("invalid type"), "{err}");
        assert!(err.to_string().ends_with("(line 2, column 4)"), "{err}");
    }
}
