//! Property tests of the parsers that read untrusted input: safetensors headers and tensors,
//! the single-file checkpoint key mapping, `models.toml`, and JSON request bodies (parse and
//! validate). Hostile inputs must give an error, never a panic, and never allocate by what a
//! header claims. Bounded case counts keep this in `cargo test` time; inputs that once crashed
//! are kept below as named regression tests.
mod http_support;

use std::path::{Path, PathBuf};

use afa::api::ApiError;
use afa::api::body::parse_json;
use afa::api::request::{NativeRequest, validate};
use afa::config::ModelRegistry;
use afa::loading::single_file::{KeyTransform, MapResult, SingleFileLayout, map_key};
use afa::loading::{LoadError, SafetensorsFile};
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afa-proptest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `bytes` as a .safetensors file, opens it and loads every tensor.
fn open_and_load(dir: &Path, bytes: &[u8]) -> Result<usize, LoadError> {
    let p = dir.join("t.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let f = SafetensorsFile::open(&p)?;
    let names: Vec<String> = f.names().map(String::from).collect();
    for n in &names {
        f.load(n, DType::F32, &Device::Cpu)?;
    }
    Ok(names.len())
}

/// A safetensors file: 8-byte little-endian header length, the JSON header, the data.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn valid_file() -> Vec<u8> {
    let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let u = Tensor::new(&[1u8, 2, 3], &Device::Cpu).unwrap();
    safetensors::serialize([("a", &t), ("b", &u)], None).unwrap()
}

#[test]
fn safetensors_absurd_header_lengths_are_refused_before_reading() {
    let dir = temp_dir("st-len");
    for len in [1u64 << 60, u64::MAX, 1 << 31, 100_000_001, 9] {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let err = open_and_load(&dir, &b).unwrap_err();
        assert!(matches!(err, LoadError::Format { .. }), "{len}: {err}");
    }
    // Shorter than the length prefix itself.
    for b in [&b""[..], b"\x02\x00\x00"] {
        assert!(matches!(
            open_and_load(&dir, b).unwrap_err(),
            LoadError::Format { .. }
        ));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn safetensors_wrong_dtypes_shapes_and_offsets_are_errors() {
    let dir = temp_dir("st-hdr");
    let headers = [
        // Shape and bytes disagree.
        r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,8]}}"#,
        // An element count that overflows.
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
        // Offsets past the end, reversed, or overlapping.
        r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,4096]}}"#,
        r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#,
        r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[18446744073709551615,7]}}"#,
        // Unknown and unsupported dtypes.
        r#"{"a":{"dtype":"Q4","shape":[8],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"BOOL","shape":[8],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}"#,
        // Not JSON, not an object, deep nesting.
        "{\"a\":",
        "[1,2,3]",
        "\u{0}\u{1}",
    ];
    for h in headers {
        let r = open_and_load(&dir, &file(h, &[0u8; 8]));
        assert!(r.is_err(), "{h} loaded");
    }
    let deep = format!(
        "{{\"__metadata__\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(open_and_load(&dir, &file(&deep, &[])).is_err());
    // Non-UTF-8 header.
    assert!(open_and_load(&dir, &file("{\"\u{0}\"", &[])).is_err());
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    assert!(open_and_load(&dir, &b).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Random bytes, and random bytes after a plausible length prefix.
    #[test]
    fn safetensors_random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        len in 0u64..300,
        prefix in any::<bool>(),
    ) {
        let dir = temp_dir("st-rand");
        let b = if prefix {
            let mut b = len.to_le_bytes().to_vec();
            b.extend_from_slice(&bytes);
            b
        } else {
            bytes
        };
        let _ = open_and_load(&dir, &b);
    }

    /// A valid file cut short anywhere, or with one byte changed, is refused or loads.
    #[test]
    fn safetensors_truncated_or_flipped_files_never_panic(
        cut in 0usize..200,
        at in 0usize..200,
        byte in any::<u8>(),
    ) {
        let dir = temp_dir("st-cut");
        let full = valid_file();
        let cut = cut.min(full.len());
        if cut < full.len() {
            prop_assert!(open_and_load(&dir, &full[..cut]).is_err());
        }
        let mut flipped = full.clone();
        let at = at % flipped.len();
        flipped[at] = byte;
        let _ = open_and_load(&dir, &flipped);
        prop_assert_eq!(open_and_load(&dir, &full).unwrap(), 2);
    }

    /// Headers made of plausible parts: dtypes, shapes, offsets.
    #[test]
    fn safetensors_generated_headers_never_panic(
        dtype in prop_oneof![
            Just("F32"), Just("F16"), Just("BF16"), Just("F64"), Just("I64"), Just("U8"),
            Just("U32"), Just("I8"), Just("BOOL"), Just("X"),
        ],
        shape in proptest::collection::vec(0u64..5_000_000_000, 0..5),
        begin in 0u64..64,
        end in 0u64..64,
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let dir = temp_dir("st-gen");
        let h = serde_json::json!({"t": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}});
        let _ = open_and_load(&dir, &file(&h.to_string(), &data));
    }
}

/// Found while writing the key proptest (and caught by `single_file_unet_block_indices_never_panic`):
/// `input_blocks.0.<m>` with m other than the conv_in's `0` (or a zero index spelled `00`)
/// underflowed `n - 1` in `map_input_block` and panicked on a hostile checkpoint.
#[test]
fn single_file_input_block_zero_is_not_a_panic() {
    let l = SingleFileLayout::sd15();
    for key in [
        "model.diffusion_model.input_blocks.0.1.proj_in.weight",
        "model.diffusion_model.input_blocks.00.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.0.1.transformer_blocks.0.attn1.to_q.weight",
    ] {
        assert_eq!(map_key(key, &l), MapResult::Unknown, "{key}");
    }
    assert!(matches!(
        map_key("model.diffusion_model.input_blocks.0.0.weight", &l),
        MapResult::Mapped(_)
    ));
}

fn key_part() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,3}",
        "[0-9]{18,24}",
        Just(String::new()),
        prop_oneof![
            Just("input_blocks"),
            Just("output_blocks"),
            Just("middle_block"),
            Just("time_embed"),
            Just("out"),
            Just("label_emb"),
            Just("in_layers"),
            Just("out_layers"),
            Just("emb_layers"),
            Just("skip_connection"),
            Just("op"),
            Just("conv"),
            Just("transformer_blocks"),
            Just("attn1"),
            Just("attn2"),
            Just("to_q"),
            Just("ff"),
            Just("net"),
            Just("proj_in"),
            Just("proj_out"),
            Just("norm"),
            Just("encoder"),
            Just("decoder"),
            Just("down"),
            Just("up"),
            Just("mid"),
            Just("block_1"),
            Just("attn_1"),
            Just("q"),
            Just("k"),
            Just("v"),
            Just("block"),
            Just("downsample"),
            Just("upsample"),
            Just("quant_conv"),
            Just("post_quant_conv"),
            Just("conv_in"),
            Just("conv_out"),
            Just("norm_out"),
            Just("text_model"),
            Just("encoder"),
            Just("layers"),
            Just("self_attn"),
            Just("q_proj"),
            Just("mlp"),
            Just("fc1"),
            Just("embeddings"),
            Just("final_layer_norm"),
            Just("weight"),
            Just("bias"),
        ]
        .prop_map(String::from),
        "[a-z_]{1,8}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// Any key (in each component's namespace or none) maps, is ignored or is unknown.
    #[test]
    fn single_file_keys_never_panic(
        prefix in prop_oneof![
            Just(""), Just("model.diffusion_model."), Just("first_stage_model."),
            Just("cond_stage_model.transformer."), Just("cond_stage_model.transformer.text_model."),
            Just("model_ema."),
        ],
        parts in proptest::collection::vec(key_part(), 0..8),
        lpb in 0usize..4,
    ) {
        let key = format!("{prefix}{}", parts.join("."));
        let _ = map_key(&key, &SingleFileLayout::sd15());
        let down = ["CrossAttnDownBlock2D", "DownBlock2D"];
        let up = ["UpBlock2D", "CrossAttnUpBlock2D"];
        let odd = SingleFileLayout::from_configs(&down, &up, lpb, 2, lpb);
        let _ = map_key(&key, &odd);
    }

    /// UNet block keys with small indices (where the index arithmetic lives).
    #[test]
    fn single_file_unet_block_indices_never_panic(
        block in prop_oneof![Just("input_blocks"), Just("output_blocks"), Just("middle_block")],
        n in 0usize..16,
        zeros in 0usize..2,
        m in 0usize..4,
        rest in proptest::collection::vec(key_part(), 0..4),
    ) {
        let key = format!(
            "model.diffusion_model.{block}.{}{n}.{m}.{}",
            "0".repeat(zeros),
            rest.join(".")
        );
        let _ = map_key(&key, &SingleFileLayout::sd15());
    }

    /// The transform's shape rule never panics, and applying it gives that shape.
    #[test]
    fn single_file_transform_shapes(shape in proptest::collection::vec(0usize..4, 0..5)) {
        for t in [KeyTransform::None, KeyTransform::SqueezeConv1x1ToLinear] {
            let n: usize = shape.iter().product();
            let x = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
            prop_assert_eq!(x.elem_count(), n);
            match t.output_shape(&shape) {
                Some(out) => {
                    let y = t.apply(x).unwrap();
                    prop_assert_eq!(y.dims(), out.as_slice());
                }
                None => prop_assert!(t.apply(x).is_err()),
            }
        }
    }
}

/// The tests' registry (the tiny ensemble alone), as a hostile file would resemble it.
const MODELS_TOML: &str = include_str!("fixtures/tiny-models.toml");

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Random text, and models.toml cut short or with one character replaced: an error or a
    /// registry, never a panic.
    #[test]
    fn models_toml_never_panics(
        text in "\\PC{0,200}",
        cut in 0usize..2000,
        at in 0usize..2000,
        c in prop_oneof![Just('['), Just(']'), Just('"'), Just('='), Just('\n'), Just('0'), Just('x'), Just('#')],
    ) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-models.toml");
        let _ = ModelRegistry::parse(&text, &path);
        let cut = MODELS_TOML.char_indices().map(|(i, _)| i).take_while(|i| *i <= cut).last().unwrap_or(0);
        let _ = ModelRegistry::parse(&MODELS_TOML[..cut], &path);
        let mut chars: Vec<char> = MODELS_TOML.chars().collect();
        let at = at % chars.len();
        chars[at] = c;
        let _ = ModelRegistry::parse(&chars.into_iter().collect::<String>(), &path);
    }
}

#[test]
fn models_toml_hostile_values_are_errors() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-models.toml");
    let base = MODELS_TOML;
    for (from, to) in [
        ("steps = 10", "steps = 99999999999999999999"),
        ("steps = 10", "steps = -1"),
        // Found by this test: a zero default side passed "multiple of 8".
        ("width = 128", "width = 0"),
        ("merge_weights = [0.5, 0.5]", "merge_weights = [1e309, nan]"),
        (
            "allowed_sizes = []",
            "allowed_sizes = [\"99999999999999999999x1\"]",
        ),
        (
            "default_ensemble = \"tiny-afa\"",
            "default_ensemble = \"nope\"",
        ),
        ("name = \"tiny-a\"", "name = \"tiny-b\""),
    ] {
        assert!(base.contains(from), "{from}");
        let text = base.replacen(from, to, 1);
        assert!(
            ModelRegistry::parse(&text, &path).is_err(),
            "{to} was accepted"
        );
    }
    let deep = format!("x = {}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(ModelRegistry::parse(&deep, &path).is_err());
    assert!(ModelRegistry::parse(base, &path).is_ok());
}

fn invalid(r: Result<NativeRequest, ApiError>) -> bool {
    matches!(r, Err(ApiError::Invalid { .. }))
}

#[test]
fn json_bodies_hostile_inputs_are_400s() {
    let deep = |s: &str| {
        format!(
            "{{\"prompt\":\"a\",\"return_attention_maps\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        )
        .replace("\"a\"", s)
    };
    for body in [
        deep("\"a\""),
        format!(
            "{{\"prompt\":{}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
        "{".repeat(100_000).to_string(),
        r#"{"prompt":"a","seed":1e400}"#.into(),
        r#"{"prompt":"a","seed":18446744073709551616}"#.into(),
        r#"{"prompt":"a","n":-1}"#.into(),
        r#"{"prompt":"a","guidance_scale":1e999}"#.into(),
        r#"{"prompt":"a","steps":1.5}"#.into(),
        r#"{"prompt":"a","prompt":"b"}"#.into(),
        "{\"prompt\":\"\\ud800\"}".into(),
    ] {
        let r = parse_json::<NativeRequest>(body.as_bytes());
        assert!(invalid(r), "{}", &body[..body.len().min(80)]);
    }
    for bytes in [
        &b"{\"prompt\":\"\xff\"}"[..],
        b"\xef\xbb\xbf{}",
        b"{\"prompt\":\"a\"}\x00",
    ] {
        assert!(invalid(parse_json::<NativeRequest>(bytes)));
    }
}

/// JSON values that look like requests: known fields with values of any type.
fn request_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|x| json!(x)),
        any::<u64>().prop_map(|x| json!(x)),
        (0u64..600).prop_map(|x| json!(x)),
        any::<f64>().prop_map(|x| json!(x)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("afa"),
            Just("mean"),
            Just("single:a"),
            Just("magicfusion"),
            Just("ddim"),
            Just("64x64"),
            Just("auto"),
            Just("0x0"),
            Just("png"),
            Just("f16"),
            Just("all"),
            Just("fake"),
        ]
        .prop_map(|s| json!(s)),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![Just("steps"), Just("blocks"), Just("format"), Just("x")]
                    .prop_map(String::from),
                inner,
                0..3
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let field = prop_oneof![
        Just("prompt"),
        Just("negative_prompt"),
        Just("model"),
        Just("n"),
        Just("width"),
        Just("height"),
        Just("size"),
        Just("seed"),
        Just("steps"),
        Just("guidance_scale"),
        Just("scheduler"),
        Just("ensemble_mode"),
        Just("return_attention_maps"),
        Just("output_format"),
        Just("output_compression"),
        Just("partial_images"),
        Just("stream"),
    ];
    (
        "\\PC{1,8}",
        proptest::collection::btree_map(field.prop_map(String::from), value, 0..6),
    )
        .prop_map(|(prompt, mut m)| {
            m.entry("prompt".into()).or_insert(json!(prompt));
            serde_json::Value::Object(m.into_iter().collect())
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    /// Any bytes: a request or a 400.
    #[test]
    fn json_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        match parse_json::<NativeRequest>(&bytes) {
            Ok(_) | Err(ApiError::Invalid { .. }) => {}
            Err(e) => prop_assert!(false, "{e:?}"),
        }
    }

    /// Request-shaped values: parse, then validate against a catalog, each either succeeding
    /// or failing with a 4xx naming a field; a validated job stays within the limits.
    #[test]
    fn json_requests_parse_and_validate_or_name_the_field(v in request_value()) {
        let catalog = http_support::fake_catalog();
        let text = v.to_string();
        let req = match parse_json::<NativeRequest>(text.as_bytes()) {
            Ok(r) => r,
            Err(ApiError::Invalid { .. }) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
        };
        match validate(&req, &catalog, 64, 7) {
            Ok(ok) => {
                let l = &catalog.limits;
                prop_assert!((1..=l.max_batch).contains(&ok.job.images.len()));
                prop_assert!(ok.job.steps >= 1 && ok.job.steps <= l.max_steps);
                prop_assert!(ok.job.width * ok.job.height <= l.max_pixels);
                prop_assert!(ok.job.partial_images <= 3);
                prop_assert!(ok.output.encoding.quality <= 100);
            }
            Err(e) => {
                let status = e.status().as_u16();
                prop_assert!(matches!(status, 400 | 404 | 413), "{status} {e:?}");
                prop_assert!(e.body()["error"]["param"].is_string(), "{e:?}");
            }
        }
    }
}
