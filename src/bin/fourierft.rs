//! The `fourierft` command line (feature `cli`): merge a PEFT FourierFT adapter into a safetensors
//! checkpoint, or inspect an adapter directory.
//!
//! Every failure prints one line, `fourierft: error: ...`, naming the file and tensor involved,
//! and exits with code 2; `--output` is written to a temporary file and renamed, so a failed merge
//! leaves no output file.

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use fourierft::config::ModuleSelector;
use fourierft::peft::{
    adapter_dir, merge_safetensors_with, prefix_hint, spectrum_key, Orientation, PeftAdapter,
    StoredShape, CONFIG_FILE, WEIGHTS_FILE,
};
use fourierft::{Error, Result};
use safetensors::tensor::Metadata;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// FourierFT adapters in Hugging Face PEFT's format.
#[derive(Parser)]
#[command(name = "fourierft", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge an adapter into a safetensors checkpoint: W = W0 + ΔW for every adapted weight.
    Merge {
        /// The base model's safetensors file.
        #[arg(long)]
        base: PathBuf,
        /// The adapter directory (PEFT's save_pretrained output).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged safetensors file.
        #[arg(long)]
        output: PathBuf,
        /// The adapter's name; non-default adapters live in ADAPTER/NAME, as PEFT saves them.
        #[arg(long, default_value = "default")]
        adapter_name: String,
        /// Prepended to module paths to find base tensors: module <path> merges into
        /// <PREFIX><path>.weight.
        #[arg(long, default_value = "")]
        base_prefix: String,
        #[command(flatten)]
        layout: LayoutArgs,
    },
    /// Describe an adapter: configuration, adapted layers, trainable parameters, file sizes.
    Inspect {
        /// The adapter directory.
        adapter: PathBuf,
        /// The adapter's name (see `merge`).
        #[arg(long, default_value = "default")]
        adapter_name: String,
        /// A base safetensors file, to show each layer's (d1, d2) and check that the adapter fits.
        #[arg(long)]
        base: Option<PathBuf>,
        /// See `merge`.
        #[arg(long, default_value = "")]
        base_prefix: String,
        #[command(flatten)]
        layout: LayoutArgs,
    },
}

/// What is known about how adapted weights are stored. PEFT's file records `fan_in_fan_out`
/// only for the last module it adapted; a square weight whose layout nothing else proves is an
/// error unless one of these says it.
#[derive(clap::Args)]
struct LayoutArgs {
    /// The base model's config.json: its model_type tells which modules are GPT-2 Conv1D
    /// (stored (in, out)).
    #[arg(long, value_name = "CONFIG_JSON")]
    base_config: Option<PathBuf>,
    /// A regex matching (in full) the module paths whose weights are stored (in, out), e.g.
    /// '.*\.(c_attn|c_proj|c_fc)'; every other module is (out, in).
    #[arg(long, value_name = "REGEX")]
    fan_in_fan_out: Option<String>,
}

impl LayoutArgs {
    fn orientation(&self) -> Result<Orientation> {
        let mut o = Orientation::new();
        if let Some(path) = &self.base_config {
            o = o.with_model_config_file(path)?;
        }
        if let Some(regex) = &self.fan_in_fan_out {
            o = o.with_fan_in_fan_out(regex)?;
        }
        Ok(o)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            return fail("a subcommand is required: merge or inspect (see fourierft --help)");
        }
        Err(e) => {
            // clap's message without the usage block, on one line.
            let text = e.render().to_string();
            let words: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .flat_map(str::split_whitespace)
                .collect();
            let message = words.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            return fail(&format!("{message} (see fourierft --help)"));
        }
    };
    // Library code does not panic on bad input; this keeps the one-line contract regardless.
    std::panic::set_hook(Box::new(|_| {}));
    match std::panic::catch_unwind(|| run(cli.command)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => fail(&e.to_string()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            fail(&format!("internal error: {msg}"))
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("fourierft: error: {}", message.replace('\n', " "));
    ExitCode::from(2)
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Merge {
            base,
            adapter,
            output,
            adapter_name,
            base_prefix,
            layout,
        } => {
            let orientation = layout.orientation()?;
            let adapter = PeftAdapter::load_named(&adapter, &adapter_name)?;
            let s = merge_safetensors_with(&base, &adapter, &base_prefix, &orientation, &output)?;
            for (name, ffo) in &s.merged {
                let layout = if *ffo { "(in, out)" } else { "(out, in)" };
                println!("merged   {name} {layout}");
            }
            for name in &s.replaced {
                println!("replaced {name}");
            }
            println!(
                "wrote {}: {} merged, {} replaced, {} copied unchanged",
                output.display(),
                s.merged.len(),
                s.replaced.len(),
                s.copied
            );
            Ok(())
        }
        Command::Inspect {
            adapter,
            adapter_name,
            base,
            base_prefix,
            layout,
        } => {
            let orientation = layout.orientation()?;
            let base = base.as_deref();
            inspect(&adapter, &adapter_name, base, &base_prefix, &orientation)
        }
    }
}

fn inspect(
    root: &Path,
    name: &str,
    base: Option<&Path>,
    prefix: &str,
    orientation: &Orientation,
) -> Result<()> {
    let dir = adapter_dir(root, name);
    let adapter = PeftAdapter::load(&dir)?;
    let c = adapter.config();
    let shapes = base.map(read_shapes).transpose()?;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());

    println!("adapter {} ({name})", dir.display());
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        let size = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        println!("  {f}: {size} bytes");
    }
    println!(
        "peft_type {}  peft_version {}  task_type {}  base_model {}",
        c.peft_type,
        opt(&c.peft_version),
        opt(&c.task_type),
        opt(&c.base_model_name_or_path)
    );
    println!(
        "n_frequency {}  scaling {}  random_loc_seed {}  init_weights {}  \
         fan_in_fan_out {}  bias {}",
        c.n_frequency,
        c.scaling,
        c.random_loc_seed,
        c.init_weights,
        c.fan_in_fan_out,
        json(&c.bias)
    );
    let target = match &c.target_modules {
        Some(ModuleSelector::Regex(r)) => format!("regex {r:?}"),
        other => json(other),
    };
    println!(
        "target_modules {target}  exclude_modules {}",
        json(&c.exclude_modules)
    );
    println!(
        "layers_to_transform {}  layers_pattern {}  modules_to_save {}",
        json(&c.layers_to_transform),
        json(&c.layers_pattern),
        json(&c.modules_to_save)
    );
    let pattern: serde_json::Map<String, serde_json::Value> = c
        .n_frequency_pattern
        .iter()
        .map(|(k, n)| (k.clone(), (*n).into()))
        .collect();
    println!("n_frequency_pattern {}", serde_json::Value::Object(pattern));

    println!("adapted layers ({}):", adapter.spectra().len());
    for (path, spectrum) in adapter.spectra() {
        let n = spectrum.elem_count();
        let shape = match &shapes {
            None => "(d1, d2) unknown: pass --base".to_string(),
            Some(s) => {
                let base = base.unwrap_or(Path::new(""));
                layer_shape(&adapter, s, base, prefix, orientation, path, n)?
            }
        };
        println!("  {path}  n={n}  {shape}");
    }
    let extra: usize = adapter
        .extra_tensors()
        .values()
        .map(|t| t.elem_count())
        .sum();
    for (name, t) in adapter.extra_tensors() {
        println!("  extra tensor {name} {:?}", t.dims());
    }
    println!(
        "trainable parameters: {} spectral coefficients + {extra} in extra tensors = {}",
        adapter.num_coefficients(),
        adapter.num_coefficients() + extra
    );
    Ok(())
}

/// `(d1, d2) = (.., ..) layout` of module `path` in the base, checking that `n` entries fit.
fn layer_shape(
    adapter: &PeftAdapter,
    shapes: &HashMap<String, Vec<usize>>,
    base: &Path,
    prefix: &str,
    orientation: &Orientation,
    path: &str,
    n: usize,
) -> Result<String> {
    let name = format!("{prefix}{path}.weight");
    let missing = || {
        let hint = match prefix_hint(path, prefix, shapes.keys().map(String::as_str)) {
            h if h.is_empty() => "; check the base prefix".to_string(),
            h => h,
        };
        Error::File {
            path: base.to_path_buf(),
            message: format!(
                "no tensor {name:?} for adapted module {path:?} ({}){hint}",
                spectrum_key(path)
            ),
        }
    };
    let dims = shapes.get(&name).ok_or_else(missing)?;
    let &[a, b] = dims.as_slice() else {
        return Err(Error::Shape {
            what: format!("tensor {name:?} of {}", base.display()),
            expected: "2 dims".into(),
            found: format!("{dims:?}"),
        });
    };
    let stored = |path: &str, dims: (usize, usize)| {
        StoredShape::of(adapter, path, dims, || {
            shapes.get(&format!("{prefix}{path}.bias")).cloned()
        })
    };
    let others = || {
        let mut all = BTreeMap::new();
        for p in adapter.spectra().keys() {
            if let Some([x, y]) = shapes
                .get(&format!("{prefix}{p}.weight"))
                .map(Vec::as_slice)
            {
                all.insert(p.clone(), stored(p, (*x, *y)));
            }
        }
        Ok(all)
    };
    let flag = adapter.config().fan_in_fan_out;
    let ffo = match orientation.resolve(path, stored(path, (a, b)), flag, others) {
        Ok(ffo) => ffo,
        Err(e) => return Ok(format!("layout unknown: {e}")),
    };
    let (d1, d2) = if ffo { (b, a) } else { (a, b) };
    // The shapes come from an unvalidated header: d1·d2 may not fit in a usize.
    let max = d1.saturating_mul(d2);
    if n > max {
        return Err(Error::EntryCount {
            context: format!("{path} (tensor {name:?} of {})", base.display()),
            n,
            max,
            d1,
            d2,
        });
    }
    let layout = if ffo { "(in, out)" } else { "(out, in)" };
    Ok(format!("(d1, d2) = ({d1}, {d2}), weight stored {layout}"))
}

/// The tensor shapes of a safetensors file, from its header only (validated as safetensors does:
/// offsets contiguous, each shape's byte size equal to its data, the data filling the file).
fn read_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |m: String| Error::File {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {m}"),
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    // Allocate only what the file can hold (and within safetensors' own limit).
    if len > 100_000_000 || len > size.saturating_sub(8) {
        return Err(bad(format!(
            "header of {len} bytes in a file of {size} bytes"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(e.to_string()))?;
    let meta: Metadata = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let data = size - 8 - len;
    if meta.data_len() as u64 != data {
        return Err(bad(format!(
            "the header describes {} bytes of tensor data, the file holds {data}",
            meta.data_len()
        )));
    }
    Ok(meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect())
}

/// Compact JSON of a configuration value, without the quotes of a plain string.
fn json<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}
