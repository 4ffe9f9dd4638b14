//! Environment specs: what a function asks for, validated before anything reaches uv.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::StoreError;

/// A Python version plus pip requirements, as `@quiver.python("3.11", pip={"pandas": "2.2"})`
/// gives it.
///
/// A requirement's value is a bare version (`"2.2"`, meaning `==2.2`), an empty string (any
/// version) or a PEP 440 specifier starting with an operator (`">=2,<3"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvSpec {
    /// The Python version: `"3.11"` or `"3.11.7"`.
    pub python: String,
    /// Package name (with optional extras, `polars[pyarrow]`) to version requirement.
    #[serde(default)]
    pub pip: BTreeMap<String, String>,
}

impl EnvSpec {
    /// A spec from a Python version and `(name, version)` pairs.
    pub fn new<'a>(python: &str, pip: impl IntoIterator<Item = (&'a str, &'a str)>) -> EnvSpec {
        EnvSpec {
            python: python.to_string(),
            pip: pip.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// Checks the spec without resolving it.
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_python(&self.python)?;
        requirements(&self.pip, &BTreeMap::new()).map(|_| ())
    }
}

/// The (major, minor, patch) prefix a spec's `python` asks for.
pub(crate) fn validate_python(python: &str) -> Result<Vec<u32>, StoreError> {
    let bad = || {
        StoreError::InvalidSpec(format!(
            "python version {python:?} is not of the form 3, 3.11 or 3.11.7"
        ))
    };
    if python.is_empty() || python.split('.').count() > 3 {
        return Err(bad());
    }
    python
        .split('.')
        .map(|p| {
            if p.is_empty() || p.len() > 4 || !p.bytes().all(|b| b.is_ascii_digit()) {
                Err(bad())
            } else {
                p.parse::<u32>().map_err(|_| bad())
            }
        })
        .collect()
}

/// The PEP 503 normalised form of a project name: lowercase, runs of `-_.` become one `-`.
pub(crate) fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Splits `name[extra,...]` into the name and its extras, validating both (PEP 508 names:
/// ASCII letters and digits, with `-_.` inside).
fn parse_name(raw: &str) -> Result<(&str, Vec<&str>), StoreError> {
    let (name, extras) = match raw.split_once('[') {
        None => (raw, Vec::new()),
        Some((name, rest)) => {
            let Some(inner) = rest.strip_suffix(']') else {
                return Err(bad_name(raw, "an unclosed extras bracket"));
            };
            let extras: Vec<&str> = inner.split(',').map(str::trim).collect();
            (name, extras)
        }
    };
    check_identifier(raw, name)?;
    for e in &extras {
        check_identifier(raw, e)?;
    }
    Ok((name, extras))
}

fn check_identifier(raw: &str, id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(bad_name(raw, "an empty name"));
    }
    if id.len() > 200 {
        return Err(bad_name(raw, "more than 200 characters"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(bad_name(raw, &format!("the character {c:?}")));
    }
    let first = id.chars().next().unwrap_or('-');
    let last = id.chars().last().unwrap_or('-');
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err(bad_name(raw, "a name must start and end with a letter or digit"));
    }
    Ok(())
}

fn bad_name(raw: &str, why: &str) -> StoreError {
    StoreError::InvalidSpec(format!(
        "package name {raw:?} is refused ({why}): only PEP 508 names such as \"pandas\" or \
         \"polars[pyarrow]\", no URLs, paths, markers or options"
    ))
}

const OPERATORS: [&str; 8] = ["===", "~=", "==", "!=", "<=", ">=", "<", ">"];

/// Turns a version requirement into a PEP 440 specifier (without the name).
fn specifier(name: &str, raw: &str) -> Result<String, StoreError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(String::new());
    }
    let bad = |why: &str| {
        StoreError::InvalidSpec(format!(
            "version {raw:?} of {name:?} is refused ({why}): use a version (\"2.2\"), an empty \
             string for any version, or a PEP 440 specifier (\">=2,<3\")"
        ))
    };
    if raw.len() > 200 {
        return Err(bad("more than 200 characters"));
    }
    let clauses: Vec<&str> = raw.split(',').map(str::trim).collect();
    let starts_with_op = OPERATORS.iter().any(|op| clauses[0].starts_with(op));
    if !starts_with_op {
        if clauses.len() > 1 {
            return Err(bad("several clauses need an operator each"));
        }
        check_version(clauses[0], true).map_err(bad)?;
        return Ok(format!("=={}", clauses[0]));
    }
    let mut out = Vec::with_capacity(clauses.len());
    for clause in clauses {
        let Some(op) = OPERATORS.iter().find(|op| clause.starts_with(**op)) else {
            return Err(bad("each clause starts with an operator"));
        };
        let version = clause[op.len()..].trim();
        check_version(version, matches!(*op, "==" | "!=")).map_err(bad)?;
        out.push(format!("{op}{version}"));
    }
    Ok(out.join(","))
}

/// A PEP 440 version as far as the characters go (uv checks the grammar itself); `*` only as
/// a trailing `.*` where the operator allows it.
fn check_version(v: &str, wildcard_ok: bool) -> Result<(), &'static str> {
    if v.is_empty() {
        return Err("an empty version");
    }
    let body = match v.strip_suffix(".*") {
        Some(b) if wildcard_ok => b,
        Some(_) => return Err("a wildcard only goes with == or !="),
        None => v,
    };
    if !body.starts_with(|c: char| c.is_ascii_digit() || c == 'v') {
        return Err("a version starts with a digit");
    }
    if !body.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '!' | '+' | '-' | '_')) {
        return Err("a character that is not part of a version");
    }
    Ok(())
}

/// The requirement lines uv resolves: `base` merged with `pip` (a package in both takes the
/// spec's requirement), sorted by normalised name so equal specs give equal input.
pub(crate) fn requirements(
    pip: &BTreeMap<String, String>,
    base: &BTreeMap<String, String>,
) -> Result<Vec<String>, StoreError> {
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    for (layer, is_spec) in [(base, false), (pip, true)] {
        let mut seen = BTreeMap::new();
        for (raw, version) in layer {
            let raw = raw.trim();
            let (name, extras) = parse_name(raw)?;
            let key = normalize(name);
            if let Some(other) = seen.insert(key.clone(), raw) {
                return Err(StoreError::InvalidSpec(format!(
                    "package {raw:?} is listed twice (also as {other:?})"
                )));
            }
            let spec = specifier(raw, version)?;
            let extras = if extras.is_empty() {
                String::new()
            } else {
                let mut e: Vec<String> = extras.iter().map(|e| normalize(e)).collect();
                e.sort();
                e.dedup();
                format!("[{}]", e.join(","))
            };
            let line = format!("{key}{extras}{spec}");
            if is_spec || !merged.contains_key(&key) {
                merged.insert(key, line);
            }
        }
    }
    Ok(merged.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reqs(pairs: &[(&str, &str)]) -> Result<Vec<String>, StoreError> {
        let pip = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        requirements(&pip, &BTreeMap::new())
    }

    #[test]
    fn versions_become_specifiers() {
        let r = reqs(&[("Pandas", "2.2"), ("numpy", ""), ("pyarrow", ">=20, <27"), ("a_b.c", "~=1.4")])
            .unwrap();
        assert_eq!(r, ["a-b-c~=1.4", "numpy", "pandas==2.2", "pyarrow>=20,<27"]);
        assert_eq!(reqs(&[("polars[PyArrow]", "2.1.*")]).unwrap(), ["polars[pyarrow]==2.1.*"]);
    }

    #[test]
    fn hostile_names_and_versions_are_refused() {
        for name in [
            "-r", "--index-url", "a b", "a;b", "a@b", "https://evil/x.whl", "./pkg", "", "a\nb",
            "pkg[", "pkg[x;y]", "a-", "/etc/passwd",
        ] {
            let err = reqs(&[(name, "")]).unwrap_err();
            assert!(matches!(err, StoreError::InvalidSpec(_)), "{name:?}: {err}");
        }
        for version in ["1.0; os_name=='nt'", "@ https://x", "1.0 --pre", ">=1 <2", "==", "1,2", "*", ">=1.*", "-e"] {
            let err = reqs(&[("pkg", version)]).unwrap_err();
            assert!(matches!(err, StoreError::InvalidSpec(_)), "{version:?}: {err}");
        }
        assert!(reqs(&[("Foo", ""), ("foo", "1")]).is_err(), "two spellings of one name");
    }

    #[test]
    fn spec_overrides_base() {
        let base = [("pyarrow".to_string(), String::new()), ("six".to_string(), String::new())].into();
        let pip = [("PyArrow".to_string(), "26.0".to_string())].into();
        assert_eq!(requirements(&pip, &base).unwrap(), ["pyarrow==26.0", "six"]);
    }

    #[test]
    fn python_versions() {
        assert_eq!(validate_python("3.11").unwrap(), [3, 11]);
        assert_eq!(validate_python("3.11.7").unwrap(), [3, 11, 7]);
        for bad in ["", "3.", "3.11.7.1", "three", "3.11rc1", ">=3.11", "../3"] {
            assert!(validate_python(bad).is_err(), "{bad}");
        }
    }
}
