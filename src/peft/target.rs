//! Which modules an adapter targets and with how many entries: PEFT's matching rules.

use crate::config::{FourierFTConfig, Ifft2Norm, ModuleSelector};
use crate::error::{Error, Result};
use regex::Regex;

/// A compiled [`FourierFTConfig`]: decides, for a module path such as
/// `encoder.layer.0.attention.self.query`, whether the adapter targets it and with which
/// `n_frequency`, exactly as PEFT's `check_target_module_exists` and FourierFT's
/// `n_frequency_pattern` lookup do.
///
/// Rules, in order:
/// 1. `exclude_modules` (list: equal or `.name` suffix; string: full regex match) ⇒ not targeted.
/// 2. A path inside a `modules_to_save` module (`(^|.*\.)m($|\..*)`) ⇒ not targeted.
/// 3. `target_modules` as a string: the regex must match the whole path.
/// 4. `target_modules` as a list: a path equal to a name is targeted; a path ending with `.name` is
///    targeted if, when `layers_to_transform` is set, its layer index (the number after a
///    `layers_pattern` segment, or by default the first number after the first two segments) is
///    one of `layers_to_transform`.
///
/// Python regexes are translated as `re.match(p)` ⇒ `\A(?:p)` and `re.fullmatch(p)` ⇒
/// `\A(?:p)\z`; a pattern the `regex` crate cannot compile (look-around, back-references) is an
/// [`Error::Config`].
///
/// ```
/// use fourierft::{config::ModuleSelector, peft::ModuleMatcher, FourierFTConfig};
/// let cfg = FourierFTConfig {
///     target_modules: Some(ModuleSelector::Names(vec!["query".into(), "value".into()])),
///     n_frequency: 100,
///     n_frequency_pattern: vec![("value".into(), 300)],
///     ..Default::default()
/// };
/// let m = ModuleMatcher::new(&cfg)?;
/// assert!(m.is_target("encoder.layer.3.attention.self.query"));
/// assert!(!m.is_target("encoder.layer.3.attention.self.key"));
/// assert_eq!(m.n_frequency("encoder.layer.3.attention.self.value"), 300);
/// assert_eq!(m.n_frequency("encoder.layer.3.attention.self.query"), 100);
/// # Ok::<(), fourierft::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ModuleMatcher {
    config: FourierFTConfig,
    target: Selector,
    exclude: Option<Selector>,
    modules_to_save: Vec<Regex>,
    layers: Option<LayerFilter>,
    n_patterns: Vec<(Regex, usize)>,
}

#[derive(Debug, Clone)]
enum Selector {
    Names(Vec<String>),
    Regex(Regex),
}

impl Selector {
    fn new(what: &str, sel: &ModuleSelector) -> Result<Self> {
        Ok(match sel {
            ModuleSelector::Names(names) => Selector::Names(names.clone()),
            ModuleSelector::Regex(p) => Selector::Regex(compile(what, &format!(r"\A(?:{p})\z"))?),
        })
    }

    /// Exact name or `.name` suffix for a list, full match for a regex.
    fn matches(&self, key: &str) -> bool {
        match self {
            Selector::Names(names) => names.iter().any(|n| key == n || ends_with_dot(key, n)),
            Selector::Regex(r) => r.is_match(key),
        }
    }
}

/// `layers_to_transform` with the regexes that find a path's layer index.
#[derive(Debug, Clone)]
struct LayerFilter {
    indices: Vec<usize>,
    patterns: Vec<Regex>,
}

impl LayerFilter {
    fn allows(&self, key: &str) -> bool {
        let index = self.patterns.iter().find_map(|r| r.captures(key));
        index
            .and_then(|c| c.name("idx").and_then(|m| m.as_str().parse::<usize>().ok()))
            .is_some_and(|i| self.indices.contains(&i))
    }
}

/// Whether `key` ends with `.name`.
fn ends_with_dot(key: &str, name: &str) -> bool {
    key.strip_suffix(name)
        .is_some_and(|head| head.ends_with('.'))
}

fn compile(what: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| {
        // A syntax error is drawn over several lines; its last line says what is wrong.
        let text = e.to_string();
        let last = text.lines().last().unwrap_or_default();
        let reason = last.strip_prefix("error: ").unwrap_or(last);
        Error::Config(format!(
            "{what}: cannot compile regex {pattern:?}: {reason}"
        ))
    })
}

impl ModuleMatcher {
    /// Compiles the matching rules of `config` (validating it first).
    ///
    /// # Errors
    /// [`Error::Config`] if the config is invalid, `target_modules` is unset or PEFT's
    /// `"all-linear"` shorthand (list the modules instead), or a regex does not compile.
    pub fn new(config: &FourierFTConfig) -> Result<Self> {
        config.validate()?;
        let target = match &config.target_modules {
            None => {
                return Err(Error::Config(
                    "target_modules is not set: list the modules to adapt or give a regex".into(),
                ))
            }
            Some(ModuleSelector::Regex(s)) if s == "all-linear" => {
                return Err(Error::Config(
                    "target_modules \"all-linear\" is a PEFT shorthand expanded from the Python \
                     model; list the module names instead"
                        .into(),
                ))
            }
            Some(sel) => Selector::new("target_modules", sel)?,
        };
        let exclude = match &config.exclude_modules {
            Some(sel) => Some(Selector::new("exclude_modules", sel)?),
            None => None,
        };
        let modules_to_save = config
            .modules_to_save
            .iter()
            .flatten()
            .map(|m| compile("modules_to_save", &format!(r"\A(?:(^|.*\.){m}($|\..*))")))
            .collect::<Result<_>>()?;
        let layers = match (&target, &config.layers_to_transform) {
            (Selector::Names(_), Some(idx)) if !idx.as_slice().is_empty() => {
                let patterns: Vec<&String> = config
                    .layers_pattern
                    .iter()
                    .flat_map(|p| p.as_slice())
                    .collect();
                let patterns = if patterns.is_empty() {
                    vec![compile(
                        "layers_to_transform",
                        r"\A(?:.*?\.[^.]*\.(?P<idx>\d+)\.)",
                    )?]
                } else {
                    patterns
                        .iter()
                        .map(|p| {
                            compile(
                                "layers_pattern",
                                &format!(r"\A(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)"),
                            )
                        })
                        .collect::<Result<_>>()?
                };
                Some(LayerFilter {
                    indices: idx.as_slice().to_vec(),
                    patterns,
                })
            }
            _ => None,
        };
        let n_patterns = config
            .n_frequency_pattern
            .iter()
            .map(|(k, n)| {
                Ok((
                    compile("n_frequency_pattern", &format!(r"\A(?:.*\.{k}$)"))?,
                    *n,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: config.clone(),
            target,
            exclude,
            modules_to_save,
            layers,
            n_patterns,
        })
    }

    /// The configuration this matcher was compiled from.
    pub fn config(&self) -> &FourierFTConfig {
        &self.config
    }

    /// Whether the adapter targets the module at `path` (PEFT's `check_target_module_exists`).
    pub fn is_target(&self, path: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(path)) {
            return false;
        }
        if self.modules_to_save.iter().any(|r| r.is_match(path)) {
            return false;
        }
        match &self.target {
            Selector::Regex(r) => r.is_match(path),
            Selector::Names(names) if names.iter().any(|n| n == path) => true,
            Selector::Names(names) => {
                names.iter().any(|n| ends_with_dot(path, n))
                    && self.layers.as_ref().map_or(true, |l| l.allows(path))
            }
        }
    }

    /// `n_frequency` for the module at `path`: the value of the first `n_frequency_pattern` key `k`
    /// whose regex `.*\.k$` matches, else of a key equal to `path`, else `n_frequency`.
    pub fn n_frequency(&self, path: &str) -> usize {
        let by_regex = self.n_patterns.iter().find(|(r, _)| r.is_match(path));
        let exact = || {
            let pattern = &self.config.n_frequency_pattern;
            pattern.iter().find(|(k, _)| k == path).map(|(_, n)| *n)
        };
        by_regex
            .map(|(_, n)| *n)
            .or_else(exact)
            .unwrap_or(self.config.n_frequency)
    }

    /// The configuration to give [`FourierLinear::add_adapter`](crate::FourierLinear::add_adapter)
    /// for the module at `path` of shape `d1 x d2` (out, in): `n_frequency` per
    /// [`n_frequency`](Self::n_frequency), `scaling` per
    /// [`effective_scaling`](FourierFTConfig::effective_scaling) (so `ifft2_norm` is folded in and
    /// reset to `"backward"`), and `fan_in_fan_out` as the layer stores its weight.
    pub fn layer_config(
        &self,
        path: &str,
        d1: usize,
        d2: usize,
        fan_in_fan_out: bool,
    ) -> FourierFTConfig {
        FourierFTConfig {
            n_frequency: self.n_frequency(path),
            scaling: self.config.effective_scaling(d1, d2),
            ifft2_norm: Ifft2Norm::Backward,
            fan_in_fan_out,
            ..self.config.clone()
        }
    }
}
