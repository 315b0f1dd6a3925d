//! The GGUF loader of the LLM demo (`fourierft_demo::llm`).
//!
//! Without assets: tiny GGUF files written here (candle's GGUF writer) — the query/key rows come
//! back in Hugging Face's layout after llama.cpp's permutation, the stock Llama loads them, and
//! bad files (not a Llama, truncated, tokenizer keys missing, a weight missing, an unknown
//! tensor) are typed errors naming the key or tensor.
//!
//! With assets (ignored by default; README's test command runs them after
//! scripts/fetch-demo-assets.sh): SmolLM2-135M-Instruct against transformers' reading of the
//! same GGUF (demo/tests/fixtures/smollm2_parity.json, made by
//! scripts/make_llm_parity_fixtures.py): token ids of 200 snippets, rendered chat prompts,
//! last-position logits to 1e-3, greedy generations.

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_transformers::models::llama::{Cache, Llama};
use fourierft_demo::llm::{bytes_to_unicode, ChatTemplate, GgufFile, LlmError};
use std::path::{Path, PathBuf};

const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A tiny Llama (hidden 8, 2 heads of 4, 1 key/value head, 1 layer, vocabulary of the 256 byte
/// characters + 2 merges + 1 control token) in Hugging Face layout, seeded.
struct Tiny {
    hf: Vec<(String, Tensor)>,
}

const H: usize = 8;
const HEADS: usize = 2;
const KV: usize = 1;
const FF: usize = 12;

fn tiny() -> Result<Tiny> {
    let vocab = 256 + 3;
    let hd = H / HEADS;
    let mut seed = 1u64;
    let mut randn = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    };
    let mut hf = vec![
        ("model.embed_tokens.weight".to_string(), randn(&[vocab, H])?),
        ("model.norm.weight".into(), (randn(&[H])? + 1.0)?),
    ];
    for (name, shape) in [
        ("input_layernorm.weight", vec![H]),
        ("post_attention_layernorm.weight", vec![H]),
        ("self_attn.q_proj.weight", vec![HEADS * hd, H]),
        ("self_attn.k_proj.weight", vec![KV * hd, H]),
        ("self_attn.v_proj.weight", vec![KV * hd, H]),
        ("self_attn.o_proj.weight", vec![H, HEADS * hd]),
        ("mlp.gate_proj.weight", vec![FF, H]),
        ("mlp.up_proj.weight", vec![FF, H]),
        ("mlp.down_proj.weight", vec![H, FF]),
    ] {
        hf.push((format!("model.layers.0.{name}"), randn(&shape)?));
    }
    Ok(Tiny { hf })
}

/// llama.cpp's converter: each head's rows `(2, hd/2)` stored as `(hd/2, 2)`.
fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inn) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inn))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inn))?)
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut s = hf.replace("model.layers.", "blk.");
    for (a, b) in map {
        s = s.replace(a, b);
    }
    s
}

fn metadata(arch: &str) -> Vec<(String, Value)> {
    let spelling = bytes_to_unicode();
    let mut tokens: Vec<Value> = spelling
        .iter()
        .map(|c| Value::String(c.to_string()))
        .collect();
    let g = spelling[b' ' as usize];
    tokens.push(Value::String("ab".into()));
    tokens.push(Value::String(format!("{g}ab")));
    tokens.push(Value::String("<|im_start|>".into()));
    let mut types = vec![Value::I32(1); tokens.len()];
    types[258] = Value::I32(3);
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("llama.embedding_length".into(), Value::U32(H as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FF as u32)),
        ("llama.block_count".into(), Value::U32(1)),
        (
            "llama.attention.head_count".into(),
            Value::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(KV as u32),
        ),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![
                Value::String("a b".into()),
                Value::String(format!("{g} ab")),
            ]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(258)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(258)),
        (
            "tokenizer.chat_template".into(),
            Value::String(SMOL_TEMPLATE.into()),
        ),
    ]
}

/// Writes a GGUF of `tiny` (query/key permuted as llama.cpp stores them) with `meta`, leaving
/// out tensors named in `drop` and adding `extra`.
fn write(
    dir: &Path,
    tiny: &Tiny,
    meta: &[(String, Value)],
    drop: &[&str],
    extra: &[&str],
) -> Result<PathBuf> {
    let mut qs = Vec::new();
    for (name, w) in &tiny.hf {
        let g = gguf_name(name);
        if drop.contains(&g.as_str()) {
            continue;
        }
        let w = if g.contains("attn_q") {
            permute(w, HEADS)?
        } else if g.contains("attn_k") {
            permute(w, KV)?
        } else {
            w.clone()
        };
        qs.push((g, QTensor::quantize(&w, GgmlDType::F32)?));
    }
    for e in extra {
        qs.push((
            e.to_string(),
            QTensor::quantize(&Tensor::ones(4, DType::F32, &Device::Cpu)?, GgmlDType::F32)?,
        ));
    }
    let path = dir.join("tiny.gguf");
    let mut f = std::fs::File::create(&path)?;
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let qs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, q)| (k.as_str(), q)).collect();
    gguf_file::write(&mut f, &meta, &qs)?;
    Ok(path)
}

#[test]
fn tiny_llama_comes_back_in_hugging_face_layout_and_loads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = tiny()?;
    let path = write(dir.path(), &t, &metadata("llama"), &[], &[])?;
    let file = GgufFile::open(&path)?;
    let llama = file.llama(&Device::Cpu)?;
    assert!(llama.config.tie_word_embeddings);
    assert_eq!(llama.config.num_key_value_heads, KV);
    assert_eq!(llama.tensors.len(), t.hf.len());
    for (name, want) in &t.hf {
        let got = &llama.tensors[name];
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{name}");
    }
    // The stock model loads from the tensors and runs.
    let dev = Device::Cpu;
    let model = Llama::load(llama.var_builder(&dev), &llama.config)?;
    let mut cache = Cache::new(false, DType::F32, &llama.config, &dev)?;
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev)?;
    let logits = model.forward(&ids, 0, &mut cache)?;
    assert_eq!(logits.dims(), &[1, 259]);
    Ok(())
}

#[test]
fn tiny_tokenizer_and_chat_template() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(dir.path(), &tiny()?, &metadata("llama"), &[], &[])?;
    let file = GgufFile::open(&path)?;
    let tok = file.tokenizer()?;
    let ids = tok
        .encode("ab ab<|im_start|>c", false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    // "ab" merged, " ab" merged, the control token whole, "c" a byte.
    assert_eq!(ids, vec![256, 257, 258, b'c' as u32]);
    let chat = ChatTemplate::from_gguf(&file)?;
    assert_eq!(
        chat.user_prompt("Hi?")?,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        chat.render(&[("system", "S"), ("user", "U")], false)?,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    );
    Ok(())
}

fn expect_err(path: &Path, f: impl Fn(&GgufFile) -> Result<(), LlmError>) -> LlmError {
    match GgufFile::open(path).and_then(|g| f(&g)) {
        Ok(()) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn bad_files_are_typed_errors_naming_what_is_wrong() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = tiny()?;
    let load = |g: &GgufFile| g.llama(&Device::Cpu).map(|_| ());
    let tokenize = |g: &GgufFile| g.tokenizer().map(|_| ());

    let p = write(dir.path(), &t, &metadata("gpt2"), &[], &[])?;
    let e = expect_err(&p, load);
    assert!(
        matches!(&e, LlmError::NotLlama { found, .. } if found == "gpt2"),
        "{e}"
    );

    let p = write(dir.path(), &t, &metadata("llama"), &[], &[])?;
    let bytes = std::fs::read(&p)?;
    std::fs::write(&p, &bytes[..bytes.len() - 40])?;
    let e = expect_err(&p, load);
    assert!(matches!(&e, LlmError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated: tensor"), "{e}");
    std::fs::write(&p, &bytes[..100])?;
    let e = expect_err(&p, load);
    assert!(matches!(&e, LlmError::File { .. }), "{e}");

    for key in [
        "tokenizer.ggml.merges",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.model",
    ] {
        let meta: Vec<_> = metadata("llama")
            .into_iter()
            .filter(|(k, _)| k != key)
            .collect();
        let p = write(dir.path(), &t, &meta, &[], &[])?;
        let e = expect_err(&p, tokenize);
        assert!(
            matches!(&e, LlmError::MissingKey { key: k, .. } if k == key),
            "{key}: {e}"
        );
    }
    let meta: Vec<_> = metadata("llama")
        .into_iter()
        .filter(|(k, _)| k != "llama.block_count")
        .collect();
    let p = write(dir.path(), &t, &meta, &[], &[])?;
    let e = expect_err(&p, load);
    assert!(
        e.to_string().contains("llama.block_count is missing"),
        "{e}"
    );

    let mut meta = metadata("llama");
    meta.retain(|(k, _)| k != "tokenizer.ggml.pre");
    meta.push(("tokenizer.ggml.pre".into(), Value::String("qwen2".into())));
    let p = write(dir.path(), &t, &meta, &[], &[])?;
    let e = expect_err(&p, tokenize);
    assert!(matches!(&e, LlmError::Tokenizer { .. }), "{e}");

    let p = write(
        dir.path(),
        &t,
        &metadata("llama"),
        &["blk.0.ffn_up.weight"],
        &[],
    )?;
    let e = expect_err(&p, load);
    assert!(
        e.to_string().contains("blk.0.ffn_up.weight: missing"),
        "{e}"
    );

    let p = write(
        dir.path(),
        &t,
        &metadata("llama"),
        &[],
        &["rope_freqs.weight"],
    )?;
    let e = expect_err(&p, load);
    assert!(
        matches!(&e, LlmError::Tensor { tensor, .. } if tensor == "rope_freqs.weight"),
        "{e}"
    );

    let mut meta = metadata("llama");
    meta.retain(|(k, _)| k != "llama.feed_forward_length");
    meta.push(("llama.feed_forward_length".into(), Value::U32(16)));
    let p = write(dir.path(), &t, &meta, &[], &[])?;
    let e = expect_err(&p, load);
    assert!(matches!(&e, LlmError::Shape { .. }), "{e}");
    Ok(())
}

// ---- SmolLM2-135M-Instruct vs transformers (needs the demo assets) ----

fn assets() -> PathBuf {
    let dir = std::env::var_os("FOURIERFT_DEMO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo-assets"));
    let gguf = dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file() && dir.join("rotten_tomatoes.jsonl").is_file(),
        "LLM demo assets missing in {}: run scripts/fetch-demo-assets.sh",
        dir.display()
    );
    dir
}

fn fixture() -> Result<serde_json::Value> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_parity.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "needs demo assets (scripts/fetch-demo-assets.sh)"]
fn smollm2_tokenizer_matches_transformers() -> Result<()> {
    let dir = assets();
    let fx = fixture()?;
    let file = GgufFile::open(dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    let tok = file.tokenizer()?;
    let chat = ChatTemplate::from_gguf(&file)?;
    let texts: Vec<String> = std::fs::read_to_string(dir.join("rotten_tomatoes.jsonl"))?
        .lines()
        .take(200)
        .map(|l| -> Result<String> {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["text"].as_str().unwrap_or_default().to_string())
        })
        .collect::<Result<_>>()?;
    let want = fx["texts"].as_array().expect("texts");
    assert_eq!(want.len(), 200);
    for (i, (t, w)) in texts.iter().zip(want).enumerate() {
        let got = tok.encode(t.as_str(), false).map_err(anyhow::Error::msg)?;
        assert_eq!(got.get_ids(), ids(w).as_slice(), "text {i}: {t:?}");
    }
    for p in fx["prompts"].as_array().expect("prompts") {
        let rendered = chat.user_prompt(p["user"].as_str().unwrap_or_default())?;
        assert_eq!(rendered, p["rendered"].as_str().unwrap_or_default());
        let got = tok
            .encode(rendered.as_str(), false)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(got.get_ids(), ids(&p["ids"]).as_slice());
        let text = tok
            .decode(&ids(&p["greedy_ids"]), false)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(text, p["greedy_text"].as_str().unwrap_or_default());
    }
    Ok(())
}

#[test]
#[ignore = "needs demo assets (scripts/fetch-demo-assets.sh)"]
fn smollm2_logits_and_greedy_generation_match_transformers() -> Result<()> {
    let dir = assets();
    let fx = fixture()?;
    let dev = Device::Cpu;
    let file = GgufFile::open(dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    let llama = file.llama(&dev)?;
    let model = Llama::load(llama.var_builder(&dev), &llama.config)?;
    let stride = fx["stride"].as_u64().expect("stride") as usize;
    for p in fx["prompts"].as_array().expect("prompts") {
        let prompt = ids(&p["ids"]);
        let mut cache = Cache::new(true, DType::F32, &llama.config, &dev)?;
        let logits = model
            .forward(
                &Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?,
                0,
                &mut cache,
            )?
            .i(0)?;
        let ours: Vec<f32> = logits.to_vec1()?;
        let want: Vec<f64> = p["logits_strided"]
            .as_array()
            .expect("logits")
            .iter()
            .filter_map(|x| x.as_f64())
            .collect();
        let strided: Vec<f64> = ours.iter().step_by(stride).map(|&x| x as f64).collect();
        assert_eq!(strided.len(), want.len());
        let max = strided
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let lse = logits
            .to_dtype(DType::F64)?
            .exp()?
            .sum_all()?
            .log()?
            .to_scalar::<f64>()?;
        let lse_want = p["logsumexp"].as_f64().expect("logsumexp");
        println!(
            "{:?}: max |Δ logit| {max:.2e} over {} ids, Δ logsumexp {:.2e}",
            &p["user"].as_str().unwrap_or_default()[..20],
            want.len(),
            (lse - lse_want).abs()
        );
        assert!(max <= 1e-3, "max |Δ logit| {max}");
        assert!(
            (lse - lse_want).abs() <= 1e-3,
            "logsumexp {lse} vs {lse_want}"
        );
        for (id, v) in ids(&p["top_ids"])
            .iter()
            .zip(p["top_logits"].as_array().expect("top"))
        {
            let d = (ours[*id as usize] as f64 - v.as_f64().unwrap_or(f64::NAN)).abs();
            assert!(d <= 1e-3, "top id {id}: Δ {d}");
        }
        // Greedy generation with the KV cache, as transformers' generate.
        let want_gen = ids(&p["greedy_ids"]);
        let mut next = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
        let mut got = vec![next];
        let mut pos = prompt.len();
        while got.len() < want_gen.len() {
            let l = model.forward(&Tensor::new(&[[next]], &dev)?, pos, &mut cache)?;
            next = l.i(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
            got.push(next);
            pos += 1;
        }
        assert_eq!(got, want_gen);
    }
    Ok(())
}
