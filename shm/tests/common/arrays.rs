//! Random Arrow arrays of any type, from a seed, and proptest strategies for types: the input of
//! the round-trip and mutation tests.

use std::sync::Arc;

use arrow_array::*;
use arrow_buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_data::ArrayDataBuilder;
use arrow_schema::{DataType, Field, Fields, IntervalUnit, TimeUnit, UnionFields, UnionMode};
use proptest::prelude::*;

/// A small deterministic generator (splitmix64), so proptest can shrink over seeds.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.u64() % n as u64) as usize }
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.u64() % 100 < percent
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u64() as u8).collect()
    }

    fn string(&mut self) -> String {
        const ALPHABET: [&str; 8] = ["a", "b", "z", "0", " ", "é", "日本", "🦀"];
        let n = self.below(20);
        (0..n).map(|_| ALPHABET[self.below(ALPHABET.len())]).collect()
    }
}

fn nulls(rng: &mut Rng, len: usize) -> Option<NullBuffer> {
    if len == 0 || rng.chance(30) {
        return None;
    }
    Some(NullBuffer::from_iter((0..len).map(|_| !rng.chance(20))))
}

/// A random array of `dt` with `len` rows.
pub fn array(dt: &DataType, len: usize, rng: &mut Rng) -> ArrayRef {
    let width = match dt {
        DataType::FixedSizeBinary(w) => Some(*w as usize),
        _ => dt.primitive_width(),
    };
    if let Some(w) = width {
        let data = ArrayDataBuilder::new(dt.clone())
            .len(len)
            .add_buffer(Buffer::from_slice_ref(rng.bytes(len * w)))
            .nulls(nulls(rng, len))
            .build()
            .expect("valid fixed-width array");
        return make_array(data);
    }
    match dt {
        DataType::Null => new_null_array(dt, len),
        DataType::Boolean => {
            let n = nulls(rng, len);
            Arc::new(BooleanArray::new((0..len).map(|_| rng.chance(50)).collect(), n))
        }
        DataType::Utf8 => Arc::new(StringArray::from_iter(opt_strings(rng, len))),
        DataType::LargeUtf8 => Arc::new(LargeStringArray::from_iter(opt_strings(rng, len))),
        DataType::Utf8View => Arc::new(StringViewArray::from_iter(opt_strings(rng, len))),
        DataType::Binary => Arc::new(BinaryArray::from_iter(opt_bytes(rng, len))),
        DataType::LargeBinary => Arc::new(LargeBinaryArray::from_iter(opt_bytes(rng, len))),
        DataType::BinaryView => Arc::new(BinaryViewArray::from_iter(opt_bytes(rng, len))),
        DataType::List(f) => {
            let (offsets, total) = offsets::<i32>(rng, len);
            let values = array(f.data_type(), total, rng);
            Arc::new(ListArray::try_new(f.clone(), offsets, values, nulls(rng, len)).expect("valid list"))
        }
        DataType::LargeList(f) => {
            let (offsets, total) = offsets::<i64>(rng, len);
            let values = array(f.data_type(), total, rng);
            Arc::new(LargeListArray::try_new(f.clone(), offsets, values, nulls(rng, len)).expect("valid list"))
        }
        DataType::FixedSizeList(f, n) => {
            let values = array(f.data_type(), len * *n as usize, rng);
            Arc::new(FixedSizeListArray::try_new(f.clone(), *n, values, nulls(rng, len)).expect("valid fsl"))
        }
        DataType::Struct(fs) => {
            let children = fs.iter().map(|f| array(f.data_type(), len, rng)).collect();
            Arc::new(StructArray::try_new(fs.clone(), children, nulls(rng, len)).expect("valid struct"))
        }
        DataType::Map(entries, sorted) => {
            let DataType::Struct(kv) = entries.data_type() else { unreachable!("map entries are a struct") };
            let (offsets, total) = offsets::<i32>(rng, len);
            let keys: ArrayRef = Arc::new(StringArray::from_iter_values((0..total).map(|i| format!("k{i}"))));
            let values = array(kv[1].data_type(), total, rng);
            let entries_arr = StructArray::try_new(kv.clone(), vec![keys, values], None).expect("valid entries");
            Arc::new(MapArray::try_new(entries.clone(), offsets, entries_arr, nulls(rng, len), *sorted).expect("valid map"))
        }
        DataType::Union(fs, mode) => {
            let ids: Vec<i8> = fs.iter().map(|(id, _)| id).collect();
            let type_ids: Vec<i8> = (0..len).map(|_| ids[rng.below(ids.len())]).collect();
            match mode {
                UnionMode::Sparse => {
                    let children = fs.iter().map(|(_, f)| array(f.data_type(), len, rng)).collect();
                    Arc::new(UnionArray::try_new(fs.clone(), scalar(&type_ids), None, children).expect("valid union"))
                }
                UnionMode::Dense => {
                    let mut counts = vec![0i32; ids.len()];
                    let offsets: Vec<i32> = type_ids
                        .iter()
                        .map(|t| {
                            let p = ids.iter().position(|x| x == t).expect("declared id");
                            counts[p] += 1;
                            counts[p] - 1
                        })
                        .collect();
                    let children = fs
                        .iter()
                        .enumerate()
                        .map(|(p, (_, f))| array(f.data_type(), counts[p] as usize, rng))
                        .collect();
                    Arc::new(
                        UnionArray::try_new(fs.clone(), scalar(&type_ids), Some(scalar(&offsets)), children)
                            .expect("valid dense union"),
                    )
                }
            }
        }
        DataType::Dictionary(k, v) => {
            let n_values = 1 + rng.below(8);
            let values = array(v, n_values, rng);
            let keys = ArrayDataBuilder::new(k.as_ref().clone())
                .len(len)
                .add_buffer(key_buffer(k, len, n_values, rng))
                .nulls(nulls(rng, len))
                .build()
                .expect("valid keys");
            let data = keys
                .into_builder()
                .data_type(dt.clone())
                .add_child_data(values.to_data())
                .build()
                .expect("valid dictionary");
            make_array(data)
        }
        other => panic!("generator does not cover {other}"),
    }
}

fn scalar<T: arrow_buffer::ArrowNativeType>(v: &[T]) -> ScalarBuffer<T> {
    ScalarBuffer::from(Buffer::from_slice_ref(v))
}

fn key_buffer(k: &DataType, len: usize, n: usize, rng: &mut Rng) -> Buffer {
    let keys = (0..len).map(|_| rng.below(n));
    match k {
        DataType::Int8 => Buffer::from_slice_ref(keys.map(|x| x as i8).collect::<Vec<_>>()),
        DataType::Int16 => Buffer::from_slice_ref(keys.map(|x| x as i16).collect::<Vec<_>>()),
        DataType::Int32 => Buffer::from_slice_ref(keys.map(|x| x as i32).collect::<Vec<_>>()),
        DataType::UInt8 => Buffer::from_slice_ref(keys.map(|x| x as u8).collect::<Vec<_>>()),
        DataType::UInt32 => Buffer::from_slice_ref(keys.map(|x| x as u32).collect::<Vec<_>>()),
        DataType::Int64 => Buffer::from_slice_ref(keys.map(|x| x as i64).collect::<Vec<_>>()),
        other => panic!("key type {other}"),
    }
}

fn offsets<O: arrow_array::OffsetSizeTrait>(rng: &mut Rng, len: usize) -> (OffsetBuffer<O>, usize) {
    // Built through a MutableBuffer (as Arrow's builders do) rather than a Vec.
    let mut offs = vec![O::usize_as(0)];
    let mut total = 0;
    for _ in 0..len {
        total += rng.below(4);
        offs.push(O::usize_as(total));
    }
    (OffsetBuffer::new(ScalarBuffer::from(Buffer::from_slice_ref(&offs))), total)
}

fn opt_strings(rng: &mut Rng, len: usize) -> Vec<Option<String>> {
    (0..len).map(|_| if rng.chance(15) { None } else { Some(rng.string()) }).collect()
}

fn opt_bytes(rng: &mut Rng, len: usize) -> Vec<Option<Vec<u8>>> {
    (0..len)
        .map(|_| if rng.chance(15) { None } else { Some({ let n = rng.below(24); rng.bytes(n) }) })
        .collect()
}

/// Every leaf type SIPC must carry.
pub fn leaf_types() -> Vec<DataType> {
    use DataType::*;
    vec![
        Null,
        Boolean,
        Int8,
        Int16,
        Int32,
        Int64,
        UInt8,
        UInt16,
        UInt32,
        UInt64,
        Float16,
        Float32,
        Float64,
        Decimal128(38, 10),
        Decimal256(76, 20),
        Date32,
        Date64,
        Time32(TimeUnit::Second),
        Time32(TimeUnit::Millisecond),
        Time64(TimeUnit::Microsecond),
        Time64(TimeUnit::Nanosecond),
        Timestamp(TimeUnit::Nanosecond, None),
        Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        Duration(TimeUnit::Second),
        Duration(TimeUnit::Nanosecond),
        Interval(IntervalUnit::YearMonth),
        Interval(IntervalUnit::DayTime),
        Interval(IntervalUnit::MonthDayNano),
        Utf8,
        LargeUtf8,
        Utf8View,
        Binary,
        LargeBinary,
        BinaryView,
        FixedSizeBinary(7),
        Dictionary(Box::new(Int32), Box::new(Utf8)),
        Dictionary(Box::new(Int8), Box::new(Int64)),
        Dictionary(Box::new(UInt32), Box::new(LargeUtf8)),
    ]
}

fn field(dt: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", dt, true))
}

/// Types up to three levels deep, built from every leaf and every nested kind.
pub fn any_type() -> impl Strategy<Value = DataType> {
    let leaves = prop::sample::select(leaf_types());
    leaves.prop_recursive(3, 24, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|t| DataType::List(field(t))),
            inner.clone().prop_map(|t| DataType::LargeList(field(t))),
            (inner.clone(), 1i32..4).prop_map(|(t, n)| DataType::FixedSizeList(field(t), n)),
            prop::collection::vec(inner.clone(), 1..4).prop_map(|ts| {
                DataType::Struct(Fields::from(
                    ts.into_iter().enumerate().map(|(i, t)| Field::new(format!("f{i}"), t, true)).collect::<Vec<_>>(),
                ))
            }),
            inner.clone().prop_map(|t| {
                let kv = Fields::from(vec![Field::new("keys", DataType::Utf8, false), Field::new("values", t, true)]);
                DataType::Map(Arc::new(Field::new("entries", DataType::Struct(kv), false)), false)
            }),
            (prop::collection::vec(inner, 1..4), any::<bool>()).prop_map(|(ts, dense)| {
                let fields: Vec<Field> = ts.into_iter().enumerate().map(|(i, t)| Field::new(format!("u{i}"), t, true)).collect();
                let ids: Vec<i8> = (0..fields.len() as i8).map(|i| i * 2 + 1).collect();
                let mode = if dense { UnionMode::Dense } else { UnionMode::Sparse };
                DataType::Union(UnionFields::try_new(ids, fields).expect("distinct ids"), mode)
            }),
        ]
    })
}

/// A batch of random columns of the given types.
pub fn batch(types: &[DataType], len: usize, seed: u64) -> RecordBatch {
    let mut rng = Rng::new(seed);
    let fields: Vec<Field> = types.iter().enumerate().map(|(i, t)| Field::new(format!("c{i}"), t.clone(), true)).collect();
    let cols = types.iter().map(|t| array(t, len, &mut rng)).collect();
    RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), cols).expect("valid batch")
}

