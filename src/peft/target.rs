//! Which modules an adapter targets and with how many entries: PEFT's matching rules.

use crate::config::{Bias, FourierFTConfig, ModuleSelector, OneOrMany};
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
///    one of `layers_to_transform`. An empty `layers_pattern` (`""` or `[]`) means the default.
/// 5. `target_modules` `"all-linear"` (any case): every path but the output layer named by
///    [`output_head`](FourierFTConfig::output_head), which must then be set; only meaningful for
///    paths of linear layers (as model-level injection asks). Unset `target_modules` is an error
///    (see [`FourierFTConfig::with_model_type`]).
///
/// The layer index is found as the PEFT version that wrote the configuration (`peft_version`)
/// finds it; the regexes changed twice (PEFT's `check_target_module_exists`):
///
/// | `peft_version` | default (no `layers_pattern`) | with `layers_pattern` `p` |
/// | --- | --- | --- |
/// | up to 0.19 | `.*\.[^.]*\.(\d+)\.` (greedy: the *last* number) | `.*\.p\.(\d+)\.` (last; `p` not at the start) |
/// | 0.20 | `.*?\.[^.]*\.(\d+)\.` (lazy: the *first* number) | `.*?\.p\.(\d+)\.` (first; `p` not at the start) |
/// | 0.21 or later, or unset | `.*?\.[^.]*\.(\d+)\.` | `(?:^\|.*?\.)p\.(\d+)\.` (first; also at the start) |
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
    /// `"all-linear"` with the output layer known ([`FourierFTConfig::output_head`]).
    AllLinear,
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
            Selector::AllLinear => true,
        }
    }
}

/// Which PEFT release's layer-index regexes apply (see [`ModuleMatcher`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerRegexes {
    /// PEFT up to 0.19: greedy, pattern after a dot.
    Greedy,
    /// PEFT 0.20: lazy, pattern after a dot.
    LazyAfterDot,
    /// PEFT 0.21 and later: lazy, pattern after a dot or at the start.
    Lazy,
}

impl LayerRegexes {
    /// The rules of `peft_version` (`"0.19.1"`, `"0.20.0.dev0"`, ...); the newest for an unset or
    /// unreadable version.
    fn of(peft_version: Option<&str>) -> Self {
        let mut parts = peft_version.unwrap_or_default().split('.');
        let num = |p: Option<&str>| -> Option<u64> {
            let p = p?;
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        match (num(parts.next()), num(parts.next())) {
            (Some(0), Some(minor)) if minor < 20 => LayerRegexes::Greedy,
            (Some(0), Some(20)) => LayerRegexes::LazyAfterDot,
            _ => LayerRegexes::Lazy,
        }
    }

    /// The regex (with group `idx`) for the default rule or for `layers_pattern` `p`.
    fn regex(self, pattern: Option<&str>) -> String {
        let any = if self == LayerRegexes::Greedy {
            ".*"
        } else {
            ".*?"
        };
        match pattern {
            None => format!(r"\A(?:{any}\.[^.]*\.(?P<idx>\d+)\.)"),
            Some(p) if self == LayerRegexes::Lazy => {
                format!(r"\A(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)")
            }
            Some(p) => format!(r"\A(?:{any}\.{p}\.(?P<idx>\d+)\.)"),
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
        let target =
            match &config.target_modules {
                None => return Err(Error::Config(
                    "target_modules is not set: PEFT fills it from the base model's model_type \
                     (its config.json); call FourierFTConfig::with_model_type(<model_type>), or \
                     list the modules to adapt or give a regex"
                        .into(),
                )),
                Some(_) if config.is_all_linear() => {
                    if config.output_head.is_none() {
                        return Err(Error::Config(
                            "target_modules \"all-linear\" is every linear layer but the model's \
                         output layer, which this crate cannot identify: set output_head to its \
                         path (PEFT's get_output_embeddings(), e.g. \"lm_head\"; \"\" for a \
                         model without one), or call FourierFTConfig::expand_all_linear with the \
                         model's linear layers"
                                .into(),
                        ));
                    }
                    Selector::AllLinear
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
                let rules = LayerRegexes::of(config.peft_version.as_deref());
                // PEFT: `layers_pattern is None or len(layers_pattern) == 0` means the default.
                let patterns: Vec<&String> = config
                    .layers_pattern
                    .iter()
                    .flat_map(|p| match p {
                        OneOrMany::One(s) if s.is_empty() => &[][..],
                        p => p.as_slice(),
                    })
                    .collect();
                let patterns = if patterns.is_empty() {
                    vec![compile("layers_to_transform", &rules.regex(None))?]
                } else {
                    patterns
                        .iter()
                        .map(|p| compile("layers_pattern", &rules.regex(Some(p))))
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
        if self.in_modules_to_save(path) {
            return false;
        }
        match &self.target {
            Selector::Regex(r) => r.is_match(path),
            Selector::AllLinear => self.config.is_output_head(path) == Some(false),
            Selector::Names(names) if names.iter().any(|n| n == path) => true,
            Selector::Names(names) => {
                names.iter().any(|n| ends_with_dot(path, n))
                    && self.layers.as_ref().is_none_or(|l| l.allows(path))
            }
        }
    }

    /// Whether the module at `path` is (inside) one of `modules_to_save`: trained in full, saved
    /// with the adapter, never adapted.
    pub fn in_modules_to_save(&self, path: &str) -> bool {
        self.modules_to_save.iter().any(|r| r.is_match(path))
    }

    /// Whether the model tensor `name` (e.g. `classifier.weight`, `encoder.layer.0.output.dense.bias`)
    /// is trained in full and saved with the adapter, as PEFT decides it: every parameter of a
    /// `modules_to_save` module, and biases per `bias` (`"all"`: every tensor named `bias` or
    /// `*.bias`, layer norms included; `"fourier_only"`: the biases of adapted modules).
    ///
    /// ```
    /// use fourierft::{config::{Bias, ModuleSelector}, peft::ModuleMatcher, FourierFTConfig};
    /// let cfg = FourierFTConfig {
    ///     target_modules: Some(ModuleSelector::Names(vec!["query".into()])),
    ///     modules_to_save: Some(vec!["classifier".into()]),
    ///     bias: Bias::FourierOnly,
    ///     ..Default::default()
    /// };
    /// let m = ModuleMatcher::new(&cfg)?;
    /// assert!(m.trains_in_full("classifier.weight"));
    /// assert!(m.trains_in_full("layer.0.query.bias"));
    /// assert!(!m.trains_in_full("layer.0.query.weight") && !m.trains_in_full("layer.0.key.bias"));
    /// # Ok::<(), fourierft::Error>(())
    /// ```
    pub fn trains_in_full(&self, name: &str) -> bool {
        let (module, param) = name.rsplit_once('.').unwrap_or(("", name));
        if !module.is_empty() && self.in_modules_to_save(module) {
            return true;
        }
        match self.config.bias {
            Bias::None => false,
            Bias::All => param == "bias",
            Bias::FourierOnly => param == "bias" && !module.is_empty() && self.is_target(module),
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
    /// for the module at `path`: `n_frequency` per
    /// [`n_frequency`](Self::n_frequency) and `fan_in_fan_out` as the layer stores its weight.
    pub fn layer_config(&self, path: &str, fan_in_fan_out: bool) -> FourierFTConfig {
        FourierFTConfig {
            n_frequency: self.n_frequency(path),
            fan_in_fan_out,
            ..self.config.clone()
        }
    }
}
