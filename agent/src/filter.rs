//! Scan filters: `col op literal` and `col IN (literals)`, joined by AND. Small on purpose: it
//! is what row-group statistics can prune with, and the scan applies it exactly after pruning.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A literal value in a filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Lit {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A boolean.
    Bool(bool),
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// One conjunct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Predicate {
    /// `column op literal`
    Cmp {
        /// Column.
        column: String,
        /// Comparison.
        op: Op,
        /// Value.
        value: Lit,
    },
    /// `column IN (values)`
    In {
        /// Column.
        column: String,
        /// Values.
        values: Vec<Lit>,
    },
}

impl Predicate {
    /// The column the predicate reads.
    pub fn column(&self) -> &str {
        match self {
            Predicate::Cmp { column, .. } | Predicate::In { column, .. } => column,
        }
    }
}

/// A conjunction of predicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filter(pub Vec<Predicate>);

/// Why a filter does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} at character {at}")]
pub struct FilterError {
    /// What is wrong.
    pub message: String,
    /// Where (0-based character offset).
    pub at: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Lit(Lit),
    Op(Op),
    In,
    And,
    LParen,
    RParen,
    Comma,
}

fn lex(s: &str) -> Result<Vec<(usize, Tok)>, FilterError> {
    let cs: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |m: &str, at: usize| FilterError { message: m.to_owned(), at };
    while i < cs.len() {
        let c = cs[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let tok = match c {
            '(' => {
                i += 1;
                Tok::LParen
            }
            ')' => {
                i += 1;
                Tok::RParen
            }
            ',' => {
                i += 1;
                Tok::Comma
            }
            '=' => {
                i += 1;
                Tok::Op(Op::Eq)
            }
            '!' if cs.get(i + 1) == Some(&'=') => {
                i += 2;
                Tok::Op(Op::Ne)
            }
            '<' => match cs.get(i + 1) {
                Some('=') => {
                    i += 2;
                    Tok::Op(Op::Le)
                }
                Some('>') => {
                    i += 2;
                    Tok::Op(Op::Ne)
                }
                _ => {
                    i += 1;
                    Tok::Op(Op::Lt)
                }
            },
            '>' => {
                if cs.get(i + 1) == Some(&'=') {
                    i += 2;
                    Tok::Op(Op::Ge)
                } else {
                    i += 1;
                    Tok::Op(Op::Gt)
                }
            }
            '\'' => {
                let mut v = String::new();
                i += 1;
                loop {
                    match cs.get(i) {
                        None => return Err(err("unterminated string", start)),
                        Some('\'') if cs.get(i + 1) == Some(&'\'') => {
                            v.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            v.push(ch);
                            i += 1;
                        }
                    }
                }
                Tok::Lit(Lit::Str(v))
            }
            '"' => {
                let mut v = String::new();
                i += 1;
                loop {
                    match cs.get(i) {
                        None => return Err(err("unterminated quoted name", start)),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            v.push(ch);
                            i += 1;
                        }
                    }
                }
                Tok::Ident(v)
            }
            c if c.is_ascii_digit() || ((c == '-' || c == '.') && cs.get(i + 1).is_some_and(|d| d.is_ascii_digit())) => {
                i += 1;
                while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '.' || ((cs[i] == '-' || cs[i] == '+') && matches!(cs[i - 1], 'e' | 'E'))) {
                    i += 1;
                }
                let text: String = cs[start..i].iter().collect();
                if let Ok(v) = text.parse::<i64>() {
                    Tok::Lit(Lit::Int(v))
                } else if let Ok(v) = text.parse::<f64>() {
                    Tok::Lit(Lit::Float(v))
                } else {
                    return Err(err(&format!("bad number {text:?}"), start));
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                    i += 1;
                }
                let word: String = cs[start..i].iter().collect();
                match word.to_ascii_uppercase().as_str() {
                    "AND" => Tok::And,
                    "IN" => Tok::In,
                    "TRUE" => Tok::Lit(Lit::Bool(true)),
                    "FALSE" => Tok::Lit(Lit::Bool(false)),
                    "OR" | "NOT" | "NULL" | "IS" | "LIKE" | "BETWEEN" => {
                        return Err(err(&format!("{word} is not supported in scan filters (use a SQL node)"), start));
                    }
                    _ => Tok::Ident(word),
                }
            }
            other => return Err(err(&format!("unexpected {other:?}"), start)),
        };
        out.push((start, tok));
    }
    Ok(out)
}

/// Parses `a = 1 AND b IN ('x', 'y') AND c >= 2.5`.
pub fn parse_filter(s: &str) -> Result<Filter, FilterError> {
    if s.len() > 64 << 10 {
        return Err(FilterError { message: "filter longer than 64 KiB".into(), at: 0 });
    }
    let toks = lex(s)?;
    let mut p = 0;
    let end = s.chars().count();
    let at = |p: usize| toks.get(p).map_or(end, |t| t.0);
    let err = |m: String, p: usize| FilterError { message: m, at: at(p) };
    let mut preds = Vec::new();
    loop {
        let column = match toks.get(p) {
            Some((_, Tok::Ident(c))) => c.clone(),
            _ => return Err(err("expected a column name".into(), p)),
        };
        p += 1;
        match toks.get(p).map(|t| &t.1) {
            Some(Tok::Op(op)) => {
                let op = *op;
                p += 1;
                let value = match toks.get(p) {
                    Some((_, Tok::Lit(l))) => l.clone(),
                    _ => return Err(err(format!("expected a literal after the comparison on {column}"), p)),
                };
                p += 1;
                preds.push(Predicate::Cmp { column, op, value });
            }
            Some(Tok::In) => {
                p += 1;
                if toks.get(p).map(|t| &t.1) != Some(&Tok::LParen) {
                    return Err(err("expected ( after IN".into(), p));
                }
                p += 1;
                let mut values = Vec::new();
                loop {
                    match toks.get(p) {
                        Some((_, Tok::Lit(l))) => values.push(l.clone()),
                        _ => return Err(err("expected a literal in the IN list".into(), p)),
                    }
                    p += 1;
                    match toks.get(p).map(|t| &t.1) {
                        Some(Tok::Comma) => p += 1,
                        Some(Tok::RParen) => {
                            p += 1;
                            break;
                        }
                        _ => return Err(err("expected , or ) in the IN list".into(), p)),
                    }
                }
                preds.push(Predicate::In { column, values });
            }
            _ => return Err(err(format!("expected a comparison or IN after {column}"), p)),
        }
        match toks.get(p).map(|t| &t.1) {
            None => break,
            Some(Tok::And) => p += 1,
            Some(_) => return Err(err("expected AND or the end of the filter".into(), p)),
        }
    }
    Ok(Filter(preds))
}

impl fmt::Display for Lit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lit::Int(v) => write!(f, "{v}"),
            Lit::Float(v) => write!(f, "{v}"),
            Lit::Str(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Lit::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Applies the filter exactly: the rows of `batch` for which every predicate holds (a null
/// compares as false).
pub fn apply(f: &Filter, batch: &arrow_array::RecordBatch) -> Result<arrow_array::RecordBatch, String> {
    use arrow_array::{Array, BooleanArray};
    let mut mask: Option<BooleanArray> = None;
    for p in &f.0 {
        let col = batch
            .column_by_name(p.column())
            .ok_or_else(|| format!("filter names column {:?}, which the table does not have", p.column()))?;
        let m = match p {
            Predicate::Cmp { op, value, .. } => compare(col.as_ref(), *op, value)?,
            Predicate::In { values, .. } => {
                let mut acc: Option<BooleanArray> = None;
                for v in values {
                    let m = compare(col.as_ref(), Op::Eq, v)?;
                    acc = Some(match acc {
                        None => m,
                        Some(a) => arrow_arith::boolean::or_kleene(&a, &m).map_err(|e| e.to_string())?,
                    });
                }
                acc.unwrap_or_else(|| BooleanArray::from(vec![false; col.len()]))
            }
        };
        mask = Some(match mask {
            None => m,
            Some(a) => arrow_arith::boolean::and_kleene(&a, &m).map_err(|e| e.to_string())?,
        });
    }
    match mask {
        None => Ok(batch.clone()),
        Some(m) => arrow_select::filter::filter_record_batch(batch, &m).map_err(|e| e.to_string()),
    }
}

fn compare(col: &dyn arrow_array::Array, op: Op, value: &Lit) -> Result<arrow_array::BooleanArray, String> {
    use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, Scalar, StringArray};
    use arrow_schema::DataType;
    use std::sync::Arc;
    let base: ArrayRef = match value {
        Lit::Int(v) => Arc::new(Int64Array::from(vec![*v])),
        Lit::Float(v) => Arc::new(Float64Array::from(vec![*v])),
        Lit::Str(v) => Arc::new(StringArray::from(vec![v.as_str()])),
        Lit::Bool(v) => Arc::new(BooleanArray::from(vec![*v])),
    };
    // Dictionary columns compare on their values.
    let target = match col.data_type() {
        DataType::Dictionary(_, v) => v.as_ref().clone(),
        t => t.clone(),
    };
    let opts = arrow_cast::CastOptions { safe: false, ..Default::default() };
    let lit = arrow_cast::cast_with_options(&base, &target, &opts)
        .map_err(|e| format!("cannot compare a {} column with {value}: {e}", col.data_type()))?;
    let lit = Scalar::new(lit);
    let r = match op {
        Op::Eq => arrow_ord::cmp::eq(&col, &lit),
        Op::Ne => arrow_ord::cmp::neq(&col, &lit),
        Op::Lt => arrow_ord::cmp::lt(&col, &lit),
        Op::Le => arrow_ord::cmp::lt_eq(&col, &lit),
        Op::Gt => arrow_ord::cmp::gt(&col, &lit),
        Op::Ge => arrow_ord::cmp::gt_eq(&col, &lit),
    };
    r.map_err(|e| format!("cannot compare a {} column with {value}: {e}", col.data_type()))
}

/// A value bound from Parquet statistics, in a form the literal can be compared with exactly.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
enum Bound {
    I(i64),
    F(f64),
    S(Vec<u8>),
}

fn lit_bound(l: &Lit, like: &Bound) -> Option<Bound> {
    match (l, like) {
        (Lit::Int(v), Bound::I(_)) => Some(Bound::I(*v)),
        (Lit::Float(v), Bound::F(_)) => Some(Bound::F(*v)),
        // Only where the conversion is exact.
        (Lit::Int(v), Bound::F(_)) if v.unsigned_abs() < 1 << 53 => Some(Bound::F(*v as f64)),
        (Lit::Str(s), Bound::S(_)) => Some(Bound::S(s.as_bytes().to_vec())),
        _ => None,
    }
}

/// Min and max of a column chunk, when its type orders the same way as the literal would.
fn bounds(c: &parquet::file::metadata::ColumnChunkMetaData) -> Option<(Bound, Bound)> {
    use parquet::basic::{ConvertedType, LogicalType, Type};
    use parquet::file::statistics::Statistics;
    let d = c.column_descr();
    let plain_int = matches!(d.logical_type_ref(), None | Some(LogicalType::Integer(parquet::basic::IntType { is_signed: true, .. })))
        && matches!(
            d.converted_type(),
            ConvertedType::NONE | ConvertedType::INT_8 | ConvertedType::INT_16 | ConvertedType::INT_32 | ConvertedType::INT_64
        );
    let utf8 = matches!(d.logical_type_ref(), Some(LogicalType::String)) || d.converted_type() == ConvertedType::UTF8;
    match (d.physical_type(), c.statistics()?) {
        (Type::INT32, Statistics::Int32(s)) if plain_int => Some((Bound::I(*s.min_opt()? as i64), Bound::I(*s.max_opt()? as i64))),
        (Type::INT64, Statistics::Int64(s)) if plain_int => Some((Bound::I(*s.min_opt()?), Bound::I(*s.max_opt()?))),
        (Type::FLOAT, Statistics::Float(s)) => Some((Bound::F(*s.min_opt()? as f64), Bound::F(*s.max_opt()? as f64))),
        (Type::DOUBLE, Statistics::Double(s)) => Some((Bound::F(*s.min_opt()?), Bound::F(*s.max_opt()?))),
        (Type::BYTE_ARRAY, Statistics::ByteArray(s)) if utf8 => {
            Some((Bound::S(s.min_opt()?.data().to_vec()), Bound::S(s.max_opt()?.data().to_vec())))
        }
        _ => None,
    }
}

/// Whether a row group may hold rows that match: false only when its statistics prove that
/// some predicate fails for every row.
pub fn may_match(f: &Filter, rg: &parquet::file::metadata::RowGroupMetaData, _schema: &parquet::schema::types::SchemaDescriptor) -> bool {
    for p in &f.0 {
        let Some(c) = rg.columns().iter().find(|c| c.column_path().string() == p.column()) else { continue };
        let Some((min, max)) = bounds(c) else { continue };
        let outside = |v: &Bound| v < &min || v > &max;
        let impossible = match p {
            Predicate::Cmp { op, value, .. } => match lit_bound(value, &min) {
                None => false,
                Some(v) => match op {
                    Op::Eq => outside(&v),
                    Op::Ne => min == max && min == v,
                    Op::Lt => min >= v,
                    Op::Le => min > v,
                    Op::Gt => max <= v,
                    Op::Ge => max < v,
                },
            },
            Predicate::In { values, .. } => values.iter().all(|l| lit_bound(l, &min).is_some_and(|v| outside(&v))),
        };
        if impossible {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_supported_forms() {
        let f = parse_filter("country IN ('IT', 'FR') AND fare >= 2.5 AND id <> -3 AND \"odd name\" = 'it''s'").unwrap();
        assert_eq!(f.0.len(), 4);
        assert_eq!(
            f.0[0],
            Predicate::In { column: "country".into(), values: vec![Lit::Str("IT".into()), Lit::Str("FR".into())] }
        );
        assert_eq!(f.0[1], Predicate::Cmp { column: "fare".into(), op: Op::Ge, value: Lit::Float(2.5) });
        assert_eq!(f.0[2], Predicate::Cmp { column: "id".into(), op: Op::Ne, value: Lit::Int(-3) });
        assert_eq!(f.0[3], Predicate::Cmp { column: "odd name".into(), op: Op::Eq, value: Lit::Str("it's".into()) });
    }

    #[test]
    fn refuses_with_a_position() {
        for (s, want) in [
            ("", "expected a column name"),
            ("a =", "expected a literal"),
            ("a = 1 OR b = 2", "OR is not supported"),
            ("a IN (1, ", "expected a literal in the IN list"),
            ("a = 'x", "unterminated string"),
            ("a = 1 b = 2", "expected AND"),
            ("a ~ 1", "unexpected '~'"),
        ] {
            let e = parse_filter(s).unwrap_err();
            assert!(e.message.contains(want), "{s:?}: {e}");
        }
    }
}
